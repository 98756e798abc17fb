"""Train a T2T-ViT with t2t_kernels as a drop-in: AdamW, warmup + cosine schedule, label smoothing, autocast on
GPU, checkpoint save/resume, a progress bar and a final accuracy line.

By default it trains on scikit-learn's bundled digits (1797 8x8 images, 10 classes; installed with the package,
no download), upsampled to --img-size. `--data DIR` trains on an ImageFolder (DIR/train, DIR/val) instead, when
torchvision is installed.

    python examples/train.py                          # digits, a few CPU minutes
    python examples/train.py --max-steps 40           # stop early (checkpoint t2t_train_ckpt.pt) ...
    python examples/train.py --resume t2t_train_ckpt.pt   # ... and finish: on the CPU bitwise the uninterrupted run
    python examples/train.py --compile reduce-overhead --img-size 224 --batch-size 128   # on a GPU

On a GPU, --compile trains through torch.compile (reduce-overhead: CUDA graphs too), the fastest way to run the
fused model there (README); the checkpoint holds the model's own state dict either way.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from t2t_kernels import create_model, list_models
from t2t_kernels.ops import BACKENDS


def digits_datasets(img_size: int, seed: int = 0):
    """sklearn's digits as (3, img, img) float images in [-1, 1]-ish, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, val = order[:split], order[split:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), 10


def folder_datasets(root: str, img_size: int):
    from torchvision import datasets, transforms  # parse_args checked that it is installed

    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(int(img_size / 0.9)), transforms.CenterCrop(img_size),
                                 transforms.ToTensor(), norm])
    train = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
    val = datasets.ImageFolder(os.path.join(root, "val"), val_tf)
    if val.class_to_idx != train.class_to_idx:  # each numbers its own sorted folders: labels would disagree
        raise SystemExit(f"--data {root}: val classes {val.classes} differ from train classes {train.classes}")
    return train, val, len(train.classes)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup (at most half the run) up to the peak at step `warmup`, then cosine decay to
    zero at step `total`."""
    warmup = min(warmup, total // 2)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast():
            logits = model(images)
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / max(1, total)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t2t_vit_7", choices=list_models())
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (needs torchvision)")
    p.add_argument("--img-size", type=int, default=32, help="a multiple of 16")
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup, at most half the run")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="t2t_kernels backend of the T2T module")
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="train and evaluate through torch.compile with this mode (off: eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"], help="autocast dtype on GPU")
    p.add_argument("--checkpoint", default="t2t_train_ckpt.pt", help="saved after every epoch and at --max-steps")
    p.add_argument("--resume", default=None, help="a checkpoint written by this script")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in all (counting those before --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # checked here, before minutes of data loading, as argparse errors
    if args.img_size < 16 or args.img_size % 16:
        p.error(f"argument --img-size: must be a positive multiple of 16, got {args.img_size}")
    if args.warmup_epochs < 0:
        p.error(f"argument --warmup-epochs: must be at least 0, got {args.warmup_epochs}")
    if not 0.0 <= args.drop_path < 1.0:
        p.error(f"argument --drop-path: must be in [0, 1), got {args.drop_path}")
    if args.data is not None:
        missing = [d for d in ("train", "val") if not os.path.isdir(os.path.join(args.data, d))]
        if missing:
            p.error(f"argument --data: {args.data} has no {' or '.join(missing)} folder")
        if importlib.util.find_spec("torchvision") is None:
            p.error("argument --data: needs torchvision")
    if args.resume is not None and not os.path.isfile(args.resume):
        p.error(f"argument --resume: no file {args.resume}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available")
    return args


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.data:
        train_set, val_set, num_classes = folder_datasets(args.data, args.img_size)
    else:
        train_set, val_set, num_classes = digits_datasets(args.img_size, args.seed)
    steps_per_epoch = len(train_set) // args.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
    # loaders get their own generator: iterating one draws a seed, which must not move the global RNG (dropout's)
    val_loader = DataLoader(val_set, batch_size=256, generator=torch.Generator())

    # the drop-in: a T2T-ViT from t2t_kernels instead of the official model
    model = create_model(args.model, img_size=args.img_size, num_classes=num_classes, backend=args.backend,
                         drop_path_rate=args.drop_path)
    model.to(device)
    # the compiled module shares the model's parameters; state dicts come from the model (no _orig_mod. prefix)
    run = model if args.compile == "off" else torch.compile(model, mode=None if args.compile == "default"
                                                            else args.compile)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and n != "cls_token"]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n == "cls_token")]
    # fused: one kernel over all parameters (on the CPU 15 instead of 35 ms per T2T-ViT-14 step on 2 cores)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  fused=device.type in ("cpu", "cuda"))
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))

    on_gpu = device.type == "cuda"
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=on_gpu and amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=on_gpu)

    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without float16 scaling (bf16, CPU): start from a fresh scale
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        if on_gpu and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step = state["step"]
        print(f"resumed from {args.resume} at step {step} of {total_steps}")

    stop = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    began, accuracy = time.perf_counter(), None
    while step < stop:  # an epoch, or the rest of one after --resume, or up to --max-steps
        epoch, done = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, done + stop - step)
        # the epoch's order comes from (seed, epoch) alone, so a resumed run needs no sampler state and slices off
        # the batches done before it without loading them
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order[done * args.batch_size:
                            end * args.batch_size].tolist(), generator=torch.Generator())
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=done, total=steps_per_epoch,
                   disable=args.no_progress)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(run(images), labels, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        accuracy = evaluate(run, val_loader, device, autocast)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                    "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if on_gpu else None,
                    "args": vars(args)}, args.checkpoint)
        where = f"epoch {epoch + 1}" + ("" if end == steps_per_epoch else f" (step {end}/{steps_per_epoch})")
        print(f"{where}: val accuracy {accuracy:.4f}  (checkpoint {args.checkpoint})")
    if accuracy is None:  # nothing left to train after --resume
        accuracy = evaluate(run, val_loader, device, autocast)
    print(f"final val accuracy {accuracy:.4f} ({num_classes} classes, chance {1 / num_classes:.3f}) after "
          f"{step} steps in {time.perf_counter() - began:.0f}s")
    return accuracy


if __name__ == "__main__":
    main()

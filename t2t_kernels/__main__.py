"""Command line.

`python -m t2t_kernels [info] --model t2t_vit_14 --img-size 224` prints the model's parameters, GMACs (counted with
torch.utils.flop_counter), the available backends and a short throughput measurement.
`python -m t2t_kernels bench [--model NAME] [--batch N] [--device cpu|cuda] [--dtype ...] [--out DIR]` benchmarks
the fused ops and the models against eager and torch.compile (see `python -m t2t_kernels bench --help`)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _img_size(text: str):
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _count(minimum: int, what: str):
    """An argparse type: an int >= minimum, with an error that says what was expected."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type: "invalid int value: 'x'"
    return parse


def _device(text: str) -> torch.device:
    """An argparse type: a CPU or CUDA device this machine has (a CUDA one only where torch sees a GPU)."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({err})") from err
    if device.type not in ("cpu", "cuda"):  # the benchmarks and the info command know these two
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available (torch {torch.__version__})")
    return device


def count_macs(model, images) -> float:
    """Multiply-accumulates of one eval forward, from torch's flop counter (2 flops per MAC). The softmax attention
    runs written out while it counts: the counter has no formula for SDPA's CPU kernel, which would leave the
    attention's products out (T2T-ViT-14 at 224: 4.37 instead of 4.78 GMACs, the official code's 4.8)."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    counter = FlopCounterMode(display=False)
    try:
        for m in fused:
            m.fused_attn = False
        with torch.no_grad(), counter:
            model(images)
    finally:
        for m, value in fused.items():
            m.fused_attn = value
    return counter.get_total_flops() / 2


def backend_report(device: torch.device) -> dict[str, list[str]]:
    from .ops import PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS

    return {op.name: op.available(device) for op in (SOFT_SPLIT_BACKENDS, PERFORMER_BACKENDS)}


def measure_throughput(model, images, steps: int, progress: bool = True) -> float:
    """Images per second of eval forwards (after one warm-up), with a progress bar."""
    from tqdm import tqdm

    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(images)
        sync()
        start = time.perf_counter()
        for _ in tqdm(range(steps), desc="throughput", disable=not progress, leave=False):
            model(images)
        sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def cmd_info(args) -> int:
    from . import EXTENSION_LOADED_TEXT, create_model
    from .ops._backends import triton_import_error

    device = args.device
    model = create_model(args.model, img_size=args.img_size, backend="eager").eval()
    images = torch.randn(1, 3, *model.img_size)
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("model", f"{args.model}  img_size {model.img_size}  tokens {model.tokens_to_token.num_patches}"),
        ("parameters", f"{params / 1e6:.2f} M (incl. the fixed pos_embed and Performer w)"),
        ("GMACs", f"{count_macs(model, images) / 1e9:.2f} per image (torch.utils.flop_counter)"),
        ("extension", EXTENSION_LOADED_TEXT),
        ("CUDA", torch.cuda.get_device_name() if torch.cuda.is_available() else "not available"),
        ("triton", triton_import_error() or "importable"),
    ] + [(f"{op} backends", f"{', '.join(names)}  (on {device})") for op, names in backend_report(device).items()]
    for label, value in rows:
        print(f"{label:<30}{value}")
    if args.steps > 0:
        model = model.to(device)
        model.set_backend(args.backend)
        batch = torch.randn(args.batch, 3, *model.img_size, device=device)
        ips = measure_throughput(model, batch, args.steps, progress=not args.no_progress)
        print(f"{'throughput':<30}{ips:.1f} images/s  (eval, batch {args.batch}, backend {args.backend}, {device})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import list_models
    from .ops import BACKENDS

    parser = argparse.ArgumentParser(prog="python -m t2t_kernels", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    # the subcommand's copies of the options default to nothing (SUPPRESS), so that they do not overwrite the values
    # of options given before the word `info`
    info = sub.add_parser("info", help="parameters, GMACs, backends and a short throughput measurement",
                          allow_abbrev=False, argument_default=argparse.SUPPRESS)
    # listed here for --help; main() hands `bench ...` to its own parser (t2t_kernels/bench/cli.py)
    sub.add_parser("bench", add_help=False,
                   help="benchmark ops and models vs eager and torch.compile: table, JSON, PNG (bench --help)")
    for p in (parser, info):  # `info` is the default command, so its options also work without the word
        p.add_argument("--model", choices=list_models())
        p.add_argument("--img-size", type=_img_size, help="224 or 224,320 (H,W); multiples of 16")
        p.add_argument("--device", type=_device)
        p.add_argument("--backend", choices=["auto", *BACKENDS])
        p.add_argument("--batch", type=_count(1, "positive"))
        p.add_argument("--steps", type=_count(0, "non-negative"), help="timed forwards (0: skip the measurement)")
        p.add_argument("--no-progress", action="store_true")
    parser.set_defaults(model="t2t_vit_14", img_size=224, device="cuda" if torch.cuda.is_available() else "cpu",
                        backend="auto", batch=8, steps=5, no_progress=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # `bench ...` leaves its options unparsed, for its own parser
    if args.command == "bench":
        from .bench.cli import main as bench_main

        before = argv[:argv.index("bench")]  # no option of the parser above takes the value "bench"
        if before:
            parser.error(f"{' '.join(before)}: options go after the word bench (python -m t2t_kernels bench --help)")
        try:
            return bench_main(argv[1:])
        except (ValueError, RuntimeError, TypeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return cmd_info(args)
    except (ValueError, RuntimeError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

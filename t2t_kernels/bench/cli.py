"""`python -m t2t_kernels bench`: times the fused ops and the models against eager and torch.compile, prints a table,
and writes results.json, results.md and speedups.png to --out.

CPU defaults finish in minutes on 2 cores (T2T-ViT-14, fp32, B=8, 224x224: issue 5's CPU target shapes); on a GPU
the defaults are T2T-ViT-7/14/24 and timm's ViT-S at bf16 autocast, B=128, 224x224.
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _models(text: str) -> tuple[str, ...]:
    from ..models import list_models

    names = ("t2t_vit_7", "t2t_vit_14", "t2t_vit_24") if text == "all" else _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no model named in {text!r}; choose from {list_models()} or 'all'")
    bad = [n for n in names if n not in list_models()]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad}; choose from {list_models()} or 'all'")
    return names


def build_parser() -> argparse.ArgumentParser:
    from ..__main__ import _count, _device, _img_size
    from .cases import OPTIMIZERS

    # allow_abbrev=False: an abbreviated option (--rec) would go into the recorded command and the --record key
    p = argparse.ArgumentParser(prog="python -m t2t_kernels bench", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=_models, default=None,
                   help="comma list of variants or 'all' (t2t_vit_7,14,24); default: t2t_vit_14 on CPU, all on GPU")
    p.add_argument("--batch", type=_count(1, "positive"), default=None, help="default 8 on CPU, 128 on GPU")
    p.add_argument("--img-size", type=_img_size, default=None, help="224 or H,W (multiples of 16); default 224")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="op input dtype and model autocast dtype (float32 = no autocast); default fp32 on CPU, "
                        "bf16 on GPU")
    p.add_argument("--out", default="bench_out", help="folder for results.json, results.md, speedups.png")
    p.add_argument("--no-ops", action="store_true", help="skip the op-level cases")
    p.add_argument("--no-model", action="store_true", help="skip the model-level cases")
    p.add_argument("--ops", default="soft_split,soft_split+layer_norm,soft_split+layer_norm+linear,"
                                    "performer_attention,post_attention,softmax_attention,dropout_add",
                   help="which op cases (comma list; soft_split+layer_norm: the split and the LayerNorm after it; "
                        "soft_split+layer_norm+linear: and the kqv product after that, forward; "
                        "post_attention: a T2T layer's projection, norm2 and MLP, forward; softmax_attention: a "
                        "backbone block's attention after its qkv projection; dropout_add: a Performer "
                        "layer's residual dropout in training)")
    p.add_argument("--cases", default=None,
                   help="only the cases whose name contains one of these (comma list), e.g. 't2t_vit_14/train step' "
                        "(case names: model/forward, model/train step, model.tokens_to_token/..., op/stage/pass)")
    p.add_argument("--providers", default=None,
                   help="only these providers (comma list), e.g. 'compile-fused' for an A/B of a T2T_* switch "
                        "(model cases: eager, fused, compile-eager, compile-fused, eager+ckpt, fused+ckpt; op cases: "
                        "eager, cpp, cuda, triton, compile)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile providers (default: torch's; 'reduce-overhead' replays CUDA "
                        "graphs, for steps whose GPU waits on the host)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                   help="the train steps' AdamW: fused (the default: one kernel over all parameters, as "
                        "examples/train.py) or foreach (torch's default, which the runs before 2026-11-28 took)")
    p.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing providers")
    p.add_argument("--timm", action=argparse.BooleanOptionalAction, default=None,
                   help="add timm's vit_small_patch16_224 (default: on for GPU runs)")
    p.add_argument("--warmup", type=_count(0, "non-negative"), default=1,
                   help="untimed calls per provider (compile, autotune, caches)")
    p.add_argument("--min-reps", type=_count(1, "positive"), default=3, help="timed calls per provider, at least")
    p.add_argument("--max-reps", type=_count(1, "positive"), default=50,
                   help="timed calls per provider, at most (at least --min-reps)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per case, at least")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--bandwidth-mb", type=_count(1, "positive"), default=None,
                   help="size of the tensor whose clone measures the copy bandwidth (default 256 CPU, 1024 GPU)")
    p.add_argument("--threads", type=_count(1, "positive"), default=None,
                   help="torch CPU threads (torch.set_num_threads); on a shared machine 1 thread can be steadier")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--markdown", action="store_true", help="print the markdown section instead of the text table")
    p.add_argument("--record", metavar="MARKDOWN",
                   help="put the markdown section into this file (e.g. BENCHMARKS.md), replacing an earlier run of "
                        "the same command on the same device")
    p.add_argument("--note", help="a line for the markdown section (e.g. 'shared machine, noisy')")
    return p


def settings_from_args(args):
    from .cases import Settings

    return Settings.defaults(
        args.device, dtype=DTYPES[args.dtype] if args.dtype else None, batch=args.batch, img_size=args.img_size,
        models=args.model, compile=not args.no_compile, compile_backend=args.compile_backend,
        compile_mode=args.compile_mode, optimizer=args.optimizer,
        checkpointing=not args.no_checkpointing, timm=args.timm,
        providers=_names(getattr(args, "providers", None)) or None)


def _names(text: str | None) -> tuple[str, ...]:
    """A comma list (of models, ops, cases, providers) as a tuple of its names; () for None or an empty list."""
    return tuple(n for n in (text or "").split(",") if n)


def main(argv=None) -> int:
    from . import report
    from .cases import TimmCase, model_cases, op_cases
    from .runner import run

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_reps < args.min_reps:
        parser.error(f"argument --max-reps: {args.max_reps} is below --min-reps {args.min_reps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    from ..models.t2t_vit import to_img_size

    to_img_size(settings.img_size)  # a clear error for sizes the model cannot take
    cases = [] if args.no_ops else op_cases(settings, ops=_names(args.ops))
    cases += [] if args.no_model else model_cases(settings)
    if args.cases is not None:
        wanted = _names(args.cases)
        names = [case.name for case in cases]
        cases = [case for case in cases if any(w in case.name for w in wanted)]
        if not cases:
            parser.error(f"argument --cases: {args.cases!r} matches none of the cases {names}")
    if settings.providers:
        offered = [p for case in cases for p in case.providers()]
        unknown = sorted(set(settings.providers) - {p.name for p in offered})
        if unknown:
            parser.error(f"argument --providers: {args.providers!r}: {unknown} not offered by the selected cases "
                         f"(they offer {sorted({p.name for p in offered})})")
        # a provider no selected case runs (compile-fused with --no-compile, cuda on a CPU) would time nothing
        runs = {p.name for p in offered if p.reason is None}
        idle = {p.name: p.reason for p in offered if p.name in settings.providers and p.name not in runs}
        if idle:
            parser.error(f"argument --providers: {args.providers!r}: "
                         + "; ".join(f"{name} is skipped in every selected case ({reason})"
                                     for name, reason in sorted(idle.items())))
    if settings.timm and TimmCase.unavailable_reason():
        print(f"note: {TimmCase.unavailable_reason()}; its rows are skipped", file=sys.stderr)
    result = run(settings, cases, argv=_recorded_argv(argv), warmup=args.warmup, min_reps=args.min_reps,
                 max_reps=args.max_reps, min_time=args.min_time, memory=not args.no_memory,
                 bandwidth_bytes=args.bandwidth_mb << 20 if args.bandwidth_mb else None,
                 progress=not args.no_progress, on_case=lambda partial: report.write_json(partial, args.out))
    paths = report.write_all(result, args.out, args.note)
    print(report.markdown(result, args.note) if args.markdown else report.text_table(result))
    print(f"\nwrote {', '.join(paths[k] for k in ('json', 'markdown', 'plot') if paths[k])}")
    if paths.get("plot_skipped"):
        print(paths["plot_skipped"], file=sys.stderr)
    if args.record:
        print(f"recorded in {args.record} (section: {report.record(args.record, result, args.note)})")
    return 0


def _recorded_argv(argv):
    """The command line that produced the numbers: without the options that only say where output goes."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--out", "--record", "--note"):
            skip = "=" not in a
            continue
        if name in ("--no-progress", "--markdown"):
            continue
        out.append(a)
    return out

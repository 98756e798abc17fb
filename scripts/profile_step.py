"""Where a benchmark case's time goes, per provider: torch.profiler's table of one case of `python -m t2t_kernels bench`.

    python scripts/profile_step.py [--case "t2t_vit_14/train step"] [--providers eager,fused] [--steps 3] [--rows 25]
                                   [--device cuda] [--batch 128] [--img-size 224] [--dtype bf16] [--out DIR]

Builds each provider's workload exactly as the benchmark does (same weights, inputs, autocast, optimizer), warms it up,
profiles --steps calls, and prints the top --rows ops by self device time (self CPU time on CPU), then the step's
wall time next to its kernels' summed time: a wall time well above the kernel time means the GPU waits for the host
(launch overhead, Python, syncs). On an H100 (2026-11-26) this found the nested autograd call in the lean
LayerNorm/GELU -> Linear backward (t2t_kernels/layers/recompute.py): 18 ms of host time per T2T-ViT-14 train step. --out also writes each provider's full table and a Chrome trace.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository's package

from t2t_kernels.bench.cases import OPTIMIZERS, model_cases  # noqa: E402
from t2t_kernels.__main__ import _count, _device, _img_size  # noqa: E402
from t2t_kernels.bench.cli import DTYPES, settings_from_args  # noqa: E402
from t2t_kernels.bench.runner import profile_calls  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="t2t_vit_14/train step", help="a model case name of the benchmark")
    p.add_argument("--providers", default="eager,fused", help="comma list of the case's providers")
    p.add_argument("--steps", type=_count(1, "positive"), default=3)
    p.add_argument("--rows", type=_count(1, "positive"), default=25)
    p.add_argument("--device", type=_device, default=None)
    p.add_argument("--batch", type=_count(1, "positive"), default=None)
    p.add_argument("--img-size", type=_img_size, default=None, help="224 or H,W (multiples of 16); default 224")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None, help="the step's AdamW (bench's)")
    p.add_argument("--out", default=None, help="folder for the full tables and Chrome traces")
    args = p.parse_args(argv)
    model = args.case.split("/")[0].split(".")[0]
    bench_args = argparse.Namespace(device=args.device, dtype=args.dtype, batch=args.batch, img_size=args.img_size,
                                    model=(model,), no_compile=False, compile_backend="inductor", compile_mode=None,
                                    no_checkpointing=False, timm=False, optimizer=args.optimizer)
    settings = settings_from_args(bench_args)
    cases = {c.name: c for c in model_cases(settings)}
    if args.case not in cases:
        p.error(f"argument --case: {args.case!r} is not one of {sorted(cases)}")
    case, device = cases[args.case], settings.device
    providers = [name for name in args.providers.split(",") if name]
    reasons = {provider.name: provider.reason for provider in case.providers()}  # None: it runs here
    bad = [f"{name} ({reasons.get(name, 'not offered')})" for name in providers if reasons.get(name, True)]
    if bad or not providers:
        p.error(f"argument --providers: {', '.join(bad) or 'none named'}; {args.case!r} runs "
                f"{[name for name, reason in reasons.items() if reason is None]} here")
    on_gpu = device.type == "cuda"
    sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    summary = []
    for name in providers:
        workload = case.build(name)
        for _ in range(2):  # compile, autotune, allocator caches
            workload()
        prof, wall, kernels = profile_calls(workload, device, args.steps)
        events = prof.key_averages()
        table = events.table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60)
        device_text = f"{kernels * 1e3:.1f} ms" if kernels is not None else "-"
        print(f"\n=== {args.case} / {name}: wall {wall * 1e3:.1f} ms per step, device time {device_text} per step "
              f"(profiled; profiling slows the host)\n{table}")
        summary.append(f"{name:>14}: wall {wall * 1e3:8.1f} ms/step, device {device_text:>10}/step")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            stem = os.path.join(args.out, name.replace("+", "_"))
            with open(stem + ".txt", "w") as f:
                f.write(events.table(sort_by=sort_key, row_limit=-1, max_name_column_width=100))
            prof.export_chrome_trace(stem + ".trace.json")
        del workload
    print(f"\n{args.case} ({settings.describe()})\n" + "\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

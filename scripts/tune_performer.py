"""Times the Triton Performer's tiles (rows per program, warps) at T2T-ViT's shapes, to choose its default on a GPU.

    python scripts/tune_performer.py [--tiles "16,4 32,4 64,4 64,8 128,8"] [--batch 128] [--dtype bf16]
                                     [--img-size 224] [--device cuda] [--min-time 1] [--out DIR]

For each T2T stage (T = 3136 and 784 at 224x224) and pass (forward, forward+backward), the benchmark's Performer
workload runs with each tile (T2T_PERFORMER_TILE) and with the default one, interleaved round by round so a drifting
machine hits them alike. Before timing, every tile's y and gradients are checked against the default tile's on the
same inputs (a tile that compiles to something wrong fails here, not in a model). Prints median times and each
tile's speed over the default's, by wall time and, on a GPU, by its kernels' time under torch.profiler (a small
case's wall time is the host's, alike for every tile); --out gets tune_performer.json with the device, versions
and date.
On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1): a smoke test at small sizes, not a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository's package

import torch  # noqa: E402

DEFAULT = "default"
KERNEL_CALLS = 10  # calls per tile profiled for the kernels' time (CUDA)


def parse_args(argv):
    from t2t_kernels.__main__ import _count, _device, _img_size
    from t2t_kernels.bench.cli import DTYPES

    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", default="16,4 32,4 64,4 64,8 128,8",
                   help="'rows,warps' candidates (the default tiles, _default_tile in the op's triton.py, are "
                        "timed beside them)")
    p.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=_count(1, "positive"), default=None)
    p.add_argument("--img-size", type=_img_size, default=None, help="224 or H,W (multiples of 16); default 224")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per case, at least")
    p.add_argument("--out", default=None, help="folder for tune_performer.json")
    return p.parse_args(argv)


def with_tile(tile: str, fn):
    """fn run with T2T_PERFORMER_TILE set to tile (unset for the default)."""
    from t2t_kernels.ops.performer_attention.triton import TILE_ENV

    def call():
        if tile == DEFAULT:
            os.environ.pop(TILE_ENV, None)
        else:
            os.environ[TILE_ENV] = tile
        try:
            return fn()
        finally:
            os.environ.pop(TILE_ENV, None)
    return call


def check_tile(tile: str, case) -> str | None:
    """None when the tile's y and input gradients match the default tile's on fresh inputs, else what differs."""
    from t2t_kernels.bench.cases import PERFORMER_E as E, PERFORMER_M as m
    from t2t_kernels.ops import performer_attention

    s = case.settings
    kqv = (0.5 * torch.randn(min(s.batch, 4), case.T, 3 * E, device=s.device)).to(s.dtype)
    w = torch.nn.init.orthogonal_(torch.empty(m, E)).mul_(m ** 0.5).to(s.device)
    grad_y = torch.randn(kqv.shape[0], case.T, E, device=s.device, dtype=s.dtype)

    def run():
        leaf = kqv.detach().requires_grad_()
        k, q, v = leaf.split(E, dim=-1)
        y = performer_attention(q, k, v, w, backend="triton")
        y.backward(grad_y)
        return y.detach(), leaf.grad

    expected, actual = with_tile(DEFAULT, run)(), with_tile(tile, run)()
    # the same math in another tiling: sums over rows and features may round in another order
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[s.dtype]
    for name, a, e in zip(("y", "grad"), actual, expected):
        scale = e.abs().max().clamp_min(1.0).item()
        try:
            torch.testing.assert_close(a.float(), e.float(), rtol=tol, atol=tol * scale)
        except AssertionError as err:
            return f"{name} differs from the default tile's: {str(err).splitlines()[1:3]}"
    return None


def main(argv=None) -> int:
    from t2t_kernels.bench.cases import FORWARD, FORWARD_BACKWARD, Settings, op_cases
    from t2t_kernels.bench.cli import DTYPES
    from t2t_kernels.bench.runner import machine_info, profile_calls, summarize, synchronize, time_round_robin
    from t2t_kernels.ops.performer_attention.triton import parse_tile

    args = parse_args(argv)
    settings = Settings.defaults(args.device, dtype=DTYPES[args.dtype] if args.dtype else None, batch=args.batch,
                                 img_size=args.img_size)
    tiles = args.tiles.split()
    for tile in tiles:  # malformed tiles fail before any timing
        parse_tile(tile)
    rows = []
    for case in op_cases(settings, ops=("performer_attention",), passes=(FORWARD, FORWARD_BACKWARD)):
        workloads = {}
        for tile in [DEFAULT, *tiles]:
            row = {"case": case.name, "tile": tile, "status": "ok"}
            rows.append(row)
            try:
                reason = None if tile == DEFAULT or case.backward else check_tile(tile, case)
                if reason:
                    row.update(status="failed", reason=reason)
                    continue
                workload = with_tile(tile, case.build("triton"))
                workload()  # compile outside the timing
                synchronize(settings.device)
                workloads[tile] = workload
            except Exception as err:  # noqa: BLE001  (a tile that does not compile or launch is a finding)
                row.update(status="failed", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        times, _ = time_round_robin(workloads, settings.device, min_reps=5, max_reps=200, min_time=args.min_time)
        case_rows = {r["tile"]: r for r in rows if r["case"] == case.name}
        for tile, ts in times.items():
            case_rows[tile].update(summarize(ts))
            # the kernels' own time (a GPU's): a small case's wall time is the host's, alike for every tile
            case_rows[tile]["kernel_s"] = (profile_calls(workloads[tile], settings.device, KERNEL_CALLS)[2]
                                           if settings.device.type == "cuda" else None)
        base, kernel_base = case_rows[DEFAULT].get("median_s"), case_rows[DEFAULT].get("kernel_s")
        print(f"\n{case.name}")
        for tile, row in case_rows.items():
            if row["status"] != "ok":
                print(f"  {tile:>8}  {row['status']}: {row['reason']}")
                continue
            row["vs_default"] = base / row["median_s"] if base else None
            line = f"  {tile:>8}  {row['median_s'] * 1e6:9.1f} us  x default {row['vs_default']:.2f}"
            if row["kernel_s"] is not None:  # CUDA
                row["kernel_vs_default"] = kernel_base / row["kernel_s"] if kernel_base else None
                line += f"   kernels {row['kernel_s'] * 1e6:9.1f} us  x default {row['kernel_vs_default']:.2f}"
            print(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {**machine_info(settings.device), "command": "python scripts/tune_performer.py "
                + " ".join(argv if argv is not None else sys.argv[1:]), "settings": settings.describe()}
        with open(os.path.join(args.out, "tune_performer.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

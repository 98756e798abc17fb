"""Small, odd-shaped forward + backward runs of every GPU kernel of the two ops, for compute-sanitizer
(scripts/gpu_checks.sh runs it under memcheck, racecheck, initcheck and synccheck). Not a pytest file.

    python tests/gpu/sanitizer_workload.py --op soft_split --backends cuda,triton
    python tests/gpu/sanitizer_workload.py --op performer_attention --device cpu   # a dry run of the same cases

Each case also checks its result against the float64 reference, so a kernel that reads the wrong (but valid)
memory fails here too. Exit status 0 when every case ran and matched; cases a backend does not support are listed
as skipped.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

# (B, C, H, W, kernel, stride, padding, layout): 1x1 images, odd sizes, stride > kernel, padding > kernel, non-square
# windows, the model's three geometries, the token view and channels_last, an empty batch
SOFT_SPLIT_CASES = [
    (1, 1, 1, 1, 1, 1, 0, "contiguous"),
    (2, 3, 17, 23, 7, 4, 2, "contiguous"),
    (2, 3, 32, 32, 7, 4, 2, "channels_last"),
    (3, 64, 8, 8, 3, 2, 1, "tokens"),
    (2, 64, 7, 9, 3, 2, 1, "tokens"),
    (1, 5, 13, 9, 3, 1, 1, "channels_last"),
    (2, 3, 5, 5, 2, 5, 0, "contiguous"),
    (1, 2, 6, 7, (1, 3), (2, 1), (3, 0), "contiguous"),
    (1, 4, 11, 3, (5, 2), (3, 4), (2, 3), "sliced"),
    (0, 3, 8, 8, 3, 2, 1, "contiguous"),
]
# (lead, T, E, m): T = E = m = 1, odd T around the block sizes, odd E, the model's widths, an empty batch
PERFORMER_CASES = [
    ((1,), 1, 1, 1), ((2,), 7, 16, 8), ((3,), 129, 64, 32), ((2, 2), 33, 24, 8), ((1,), 257, 40, 7),
    ((), 65, 64, 32), ((2,), 1000, 64, 32), ((1,), 63, 3, 5), ((0,), 5, 16, 8),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_shape(case):
    B, C, H, W, _, _, _, layout = case
    return {"tokens": (B, H * W, C), "channels_last": (B, H, W, C),
            "sliced": (B + 1, C + 2, 2 * H + 1, W + 3)}.get(layout, (B, C, H, W))


def image_view(base, case):
    """x (B, C, H, W) as a view of base: the token view, channels_last, a strided slice, or base itself."""
    B, C, H, W, _, _, _, layout = case
    if layout == "tokens":
        return base.transpose(1, 2).view(B, C, H, W)
    if layout == "channels_last":
        return base.permute(0, 3, 1, 2)
    if layout == "sliced":
        return base[1:, 1:C + 1, 1::2, 2:W + 2]
    return base


def run_soft_split(backend, dtype, device):
    from t2t_kernels.ops import soft_split

    for case in SOFT_SPLIT_CASES:
        _, _, _, _, k, s, p, _ = case
        gen = torch.Generator().manual_seed(len(str(case)))
        base = torch.randn(base_shape(case), generator=gen).to(device=device, dtype=dtype).requires_grad_()
        y = soft_split(image_view(base, case), k, s, p, backend=backend)
        grad = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
        y.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        base64 = base.detach().double().requires_grad_()
        expected = F.unfold(image_view(base64, case), k, padding=p, stride=s).transpose(1, 2)
        expected.backward(grad.double())
        assert torch.equal(y.double(), expected.detach()), f"soft_split {backend} {dtype} {case}: forward differs"
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
        torch.testing.assert_close(base.grad.double(), base64.grad, rtol=tol, atol=tol,
                                   msg=lambda m: f"soft_split {backend} {dtype} {case}: grad: {m}")
        yield case


def run_performer(backend, dtype, device):
    from t2t_kernels.ops import performer_attention
    from t2t_kernels.ops.performer_attention import reference

    for case in PERFORMER_CASES:
        lead, T, E, m = case
        gen = torch.Generator().manual_seed(len(str(case)))
        qkv = (0.5 * torch.randn(*lead, T, 3 * E, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
        w = (torch.nn.init.orthogonal_(torch.empty(m, E), generator=gen) * math.sqrt(m)).to(device)
        y = performer_attention(*qkv.split(E, dim=-1), w, backend=backend)
        grad = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
        y.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        qkv64 = qkv.detach().double().requires_grad_()
        expected = reference.performer_attention(*qkv64.split(E, dim=-1), w.double(), 1e-8)
        expected.backward(grad.double())
        rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
        for name, got, want in (("y", y.detach(), expected.detach()), ("grad", qkv.grad, qkv64.grad)):
            scale = want.abs().max().clamp_min(1.0).item() if want.numel() else 1.0
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale,
                                       msg=lambda msg: f"performer {backend} {dtype} {case}: {name}: {msg}")
        yield case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["soft_split", "performer_attention", "all"], default="all")
    parser.add_argument("--backends", default="cuda,triton", help="comma list (default: cuda,triton)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    from t2t_kernels.ops import PERFORMER_BACKENDS, SOFT_SPLIT_BACKENDS

    ops = {"soft_split": (SOFT_SPLIT_BACKENDS, run_soft_split), "performer_attention": (PERFORMER_BACKENDS, run_performer)}
    selected = list(ops) if args.op == "all" else [args.op]
    ran = 0
    for op in selected:
        backends, run = ops[op]
        for backend in args.backends.split(","):
            for dtype_name in args.dtypes.split(","):
                dtype = DTYPES[dtype_name]
                reason = backends.unavailable_reason(backend, torch.device(args.device), dtype)
                if reason:
                    print(f"skipped  {op:<20} {backend:<7} {dtype_name:<9} {reason}")
                    continue
                count = sum(1 for _ in run(backend, dtype, args.device))
                ran += count
                print(f"ok       {op:<20} {backend:<7} {dtype_name:<9} {count} cases, forward + backward")
    if ran == 0:
        print("error: no case ran (no backend available on this device?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

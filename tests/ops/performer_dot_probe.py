"""A Triton kernel that runs the Performer kernels' _dot on a bf16 tile and on the same tile widened to fp32 (imported
by a test only where triton is installed)."""
import triton
import triton.language as tl

from t2t_kernels.ops.performer_attention.triton import _dot


@triton.jit
def split_products(a_ptr, b_ptr, out_ptr, N: tl.constexpr, PART: tl.constexpr):
    """out[0] = a @ b with a bf16, out[1] with a widened to fp32; out[2], out[3]: b @ a likewise (split products)."""
    offs = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    a, b = tl.load(a_ptr + offs), tl.load(b_ptr + offs)
    tl.store(out_ptr + offs, _dot(a, b, True, PART))
    tl.store(out_ptr + N * N + offs, _dot(a.to(tl.float32), b, True, PART))
    tl.store(out_ptr + 2 * N * N + offs, _dot(b, a, True, PART))
    tl.store(out_ptr + 3 * N * N + offs, _dot(b, a.to(tl.float32), True, PART))

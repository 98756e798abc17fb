"""Input layouts, shapes, test ids and checks shared by the soft split op tests (test_soft_split,
test_soft_split_layer_norm)."""
import torch

VIEWS = {  # layout -> (leaf shape from (B, C, H, W), the view of the leaf that is the (B, C, H, W) input)
    "contiguous": (lambda B, C, H, W: (B, C, H, W), lambda t, B, C, H, W: t),
    "channels_last": (lambda B, C, H, W: (B, H, W, C), lambda t, B, C, H, W: t.permute(0, 3, 1, 2)),
    # tokens (B, N, C) as the image (B, C, H, W): the free view the T2T module uses
    "token_view": (lambda B, C, H, W: (B, H * W, C), lambda t, B, C, H, W: t.transpose(1, 2).view(B, C, H, W)),
    # every dim strided and W not innermost: a sliced, transposed buffer
    "strided": (lambda B, C, H, W: (B, C, 2 * W, H + 1), lambda t, B, C, H, W: t[:, :, ::2, 1:].transpose(2, 3)),
    # channels innermost but not unit-stride: every other channel of a channels_last buffer
    "channels_last_sliced": (lambda B, C, H, W: (B, H, W, 2 * C), lambda t, B, C, H, W: t.permute(0, 3, 1, 2)[:, ::2]),
}
LAYOUTS = tuple(VIEWS)

# (B, C, H, W, kernel_size, stride, padding): the model's two settings (k7 s4 p2 on the image, k3 s2 p1 on tokens),
# odd and non-square sizes with a rectangular kernel/stride/padding, stride > kernel and stride < kernel, stride 1,
# C = 1, B = 1
SHAPES = [
    (2, 3, 16, 16, 7, 4, 2),
    (1, 8, 8, 8, 3, 2, 1),
    (2, 3, 17, 13, (7, 5), (4, 3), (2, 1)),
    (2, 4, 11, 9, 2, 3, 1),
    (1, 5, 9, 10, 3, 1, 1),
    (3, 1, 8, 7, (3, 2), (2, 1), (0, 1)),
]

# (H, W, kernel_size, stride, padding) with padding >= kernel_size: whole windows (rows, columns) lie in the padding,
# on every side
PADDING_BEYOND_KERNEL = [(2, 2, 1, 1, 3), (3, 4, 2, 3, 5), (1, 1, 3, 1, 7), (5, 3, (2, 1), (2, 1), (4, 2))]

STAGES = [  # T2T-ViT-14 at 224: stage 0 image, stages 1 and 2 token views
    ((3, 224, 224), "contiguous", 7, 4, 2),
    ((64, 56, 56), "token_view", 3, 2, 1),
    ((64, 28, 28), "token_view", 3, 2, 1),
]
STAGE_IDS = ["stage0", "stage1", "stage2"]


def shape_id(shape):
    B, C, H, W, k, s, p = shape
    return f"B{B}-C{C}-{H}x{W}-k{k}-s{s}-p{p}".replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")


def padding_case_id(case):
    return "H{}-W{}-k{}-s{}-p{}".format(*case)


def make_input(B, C, H, W, layout, dtype=torch.float32, device="cpu"):
    """A random leaf tensor and a function giving the (B, C, H, W) view of it with the strides of `layout`."""
    leaf_shape, view = VIEWS[layout]
    leaf = torch.randn(leaf_shape(B, C, H, W), device=device, dtype=dtype)
    return leaf, lambda t: view(t, B, C, H, W)


def assert_compiles_like_eager(fn, inputs):
    """torch.compile(fn, fullgraph=True) (no graph break) gives fn's value and the same gradients of `inputs`."""
    compiled = torch.compile(fn, fullgraph=True)
    args = [t.clone().requires_grad_() for t in inputs]
    expected_args = [t.clone().requires_grad_() for t in inputs]
    got = compiled(*args)
    want = fn(*expected_args)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, e in zip(args, expected_args):
        torch.testing.assert_close(a.grad, e.grad)

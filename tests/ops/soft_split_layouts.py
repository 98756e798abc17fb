"""Input layouts and shape ids shared by the soft split op tests (test_soft_split, test_soft_split_layer_norm)."""
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


def shape_id(shape):
    B, C, H, W, k, s, p = shape
    return f"B{B}-C{C}-{H}x{W}-k{k}-s{s}-p{p}".replace(" ", "").replace("(", "").replace(")", "").replace(",", "_")


def make_input(B, C, H, W, layout, dtype=torch.float32, device="cpu"):
    """A random leaf tensor and a function giving the (B, C, H, W) view of it with the strides of `layout`."""
    leaf_shape, view = VIEWS[layout]
    leaf = torch.randn(leaf_shape(B, C, H, W), device=device, dtype=dtype)
    return leaf, lambda t: view(t, B, C, H, W)

"""Tensors whose element offsets pass 2^31 without 8 GB of memory, for the int64-indexing tests on CPU."""
import math

import torch

BATCH_STRIDE = 2**30 + 2**20  # elements: batch element 2 starts past 2^31


def views_past_int32(shape, count, dtype, scale=1.0, batch_stride=BATCH_STRIDE):
    """count random tensors (randn * scale) of `shape` (at least 3 along dim 0, each element contiguous), as views
    with batch stride `batch_stride` elements into one storage: their last elements lie past 2^31. The storage is
    virtual (never written as a whole), so only the pages of the views are ever backed by memory."""
    B, inner = shape[0], math.prod(shape[1:])
    assert B >= 3 and inner * count <= batch_stride
    numel = (B - 1) * batch_stride + count * inner
    flat = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage(numel * dtype.itemsize), 0, (numel,), (1,))
    strides = (batch_stride,) + tuple(math.prod(shape[d + 1:]) for d in range(1, len(shape)))
    views = [flat.as_strided(shape, strides, i * inner) for i in range(count)]
    for view in views:
        view.copy_(torch.randn(shape) * scale)
    assert views[-1].storage_offset() + (B - 1) * batch_stride > 2**31
    return views


def image_past_int32(dtype):
    """A random (3, 2, 9, 9) image whose last element lies past 2^31 (views_past_int32), for the soft split ops."""
    (image,) = views_past_int32((3, 2, 9, 9), 1, dtype)
    assert image.stride(0) > 2 * 9 * 9  # a view, not a copy
    return image

"""The fused ops of the model: soft_split, performer_attention, soft_split_layer_norm (the soft split with the
LayerNorm that follows it; soft_split_layer_norm_linear adds the product after it), post_attention (a layer's
projection, skip and residual MLP after its attention), softmax_attention (the backbone's multi-head attention of a
packed qkv) and dropout_add (a residual sum with dropout, for CPU training). Each lives in its own folder: reference.py
(eager, the truth), triton.py (kernels), __init__.py (custom ops, fake kernels, autograd, backend dispatch)."""
from .._extension import EXTENSION_ERROR, EXTENSION_LOADED
from ._backends import BACKENDS
from .dropout_add import BACKENDS as DROPOUT_ADD_BACKENDS
from .dropout_add import dropout_add
from .performer_attention import BACKENDS as PERFORMER_BACKENDS
from .performer_attention import performer_attention
from .post_attention import BACKENDS as POST_ATTENTION_BACKENDS
from .post_attention import post_attention
from .softmax_attention import BACKENDS as SOFTMAX_ATTENTION_BACKENDS
from .softmax_attention import softmax_attention
from .soft_split import BACKENDS as SOFT_SPLIT_BACKENDS
from .soft_split import soft_split
from .soft_split_layer_norm import BACKENDS as SOFT_SPLIT_LAYER_NORM_BACKENDS
from .soft_split_layer_norm import LINEAR_BACKENDS as SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS
from .soft_split_layer_norm import soft_split_layer_norm, soft_split_layer_norm_linear

__all__ = ["soft_split", "performer_attention", "soft_split_layer_norm", "soft_split_layer_norm_linear",
           "post_attention", "softmax_attention", "dropout_add", "BACKENDS", "EXTENSION_LOADED", "EXTENSION_ERROR",
           "SOFT_SPLIT_BACKENDS", "PERFORMER_BACKENDS", "SOFT_SPLIT_LAYER_NORM_BACKENDS",
           "SOFT_SPLIT_LAYER_NORM_LINEAR_BACKENDS", "POST_ATTENTION_BACKENDS", "SOFTMAX_ATTENTION_BACKENDS",
           "DROPOUT_ADD_BACKENDS"]

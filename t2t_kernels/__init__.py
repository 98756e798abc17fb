"""t2t_kernels: T2T-ViT with fused kernels for its soft split and Performer attention."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the extension and registers the ops)

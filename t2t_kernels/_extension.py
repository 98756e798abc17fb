"""Loads the compiled extension ``t2t_kernels._C`` (op schemas + C++/CUDA kernels) if it is there.

The package works without it: the ops then run their eager references (or Triton on CUDA tensors).
Set ``T2T_KERNELS_DISABLE_EXT=1`` to run without the extension even when it is built (the tests use it).
"""
import functools
import os
import warnings

import torch

from ._env import env_flag

_DISABLE_ENV = "T2T_KERNELS_DISABLE_EXT"


def _load():
    if env_flag(_DISABLE_ENV, False):
        return None, f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
    try:
        from t2t_kernels import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except (ImportError, OSError) as err:
        warnings.warn(
            f"t2t_kernels: compiled extension not loaded ({err}); the cpp/cuda backends are off and the ops fall back "
            "to eager (or Triton on CUDA). Rebuild with `pip install --no-build-isolation -e .` to enable them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, f"not loaded: {err}"
    return _C, None


_C, EXTENSION_ERROR = _load()
EXTENSION_LOADED = _C is not None


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """True when the extension registered a kernel for ``t2t_kernels::<op>`` under that dispatch key. Memoised: the
    extension registers its kernels when it loads, and the dispatcher query (~18 us) ran on every op call. (A plain
    function around the cache: torch.compiler.assume_constant_result marks it, and dynamo traces into lru_cache.)"""
    return _has_kernel(qualname, dispatch_key)


@functools.lru_cache(maxsize=None)
def _has_kernel(qualname: str, dispatch_key: str) -> bool:
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)

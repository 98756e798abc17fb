"""Parameter helpers the op suites share: dtype ids, (backend, dtype) params, skipping an unavailable backend."""
import pytest
import torch


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def backend_dtype_params(dtypes, only=None):
    """pytest params (backend, dtype) for every dtype of every backend in `dtypes` (backend -> its dtypes), or for
    those of the dtypes in `only`."""
    return [pytest.param(b, d, id=f"{b}-{dtype_name(d)}") for b in dtypes for d in dtypes[b]
            if only is None or d in only]


def skip_unless_available(backends, backend, dtype=torch.float32, device="cpu"):
    """Skips the test, with the reason, when the op (its OpBackends) cannot run `backend` here."""
    reason = backends.unavailable_reason(backend, torch.device(device), dtype)
    if reason:
        pytest.skip(reason)

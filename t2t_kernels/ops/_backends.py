"""Backend selection shared by the ops: which implementations exist, which one "auto" picks, clear errors."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from .._extension import EXTENSION_ERROR, EXTENSION_LOADED, has_kernel
from ._registry import autocast_enabled

BACKENDS = ("eager", "cpp", "cuda", "triton")

# dynamo cannot trace the dispatcher query; the registrations do not change while a graph is traced
_kernel_registered = torch.compiler.assume_constant_result(has_kernel)


_triton_import = []  # memo: [error or None], filled on the first query


def triton_import_error() -> str | None:
    if not _triton_import:
        try:
            import triton  # noqa: F401
        except Exception as err:  # a broken triton install raises more than ImportError
            _triton_import.append(f"triton is not importable ({type(err).__name__}: {err})")
        else:
            _triton_import.append(None)
    return _triton_import[0]


# dynamo should not trace the import; whether triton imports does not change while a graph is traced
_triton_error = torch.compiler.assume_constant_result(triton_import_error)


def triton_interpreting() -> bool:
    """TRITON_INTERPRET read as triton reads its boolean switches (so "false" or "off" is off)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


OP_NAMES = ("soft_split", "soft_split_layer_norm", "soft_split_layer_norm_linear", "performer_attention",
            "post_attention", "softmax_attention", "dropout_add")
EAGER_OPS_ENV = "T2T_EAGER_OPS"


def eager_by_request(op: str) -> bool:
    """Whether T2T_EAGER_OPS (a comma list of op names, or "all") asks "auto" to run `op` on its eager formula:
    for A/B timing, for debugging, and under torch.compile to let inductor generate the op's code."""
    names = _requested_eager_ops(os.environ.get(EAGER_OPS_ENV, ""))
    return op in names or "all" in names


@functools.lru_cache(maxsize=16)  # parsed once per value: every op call asks (an unknown name raises each time)
def _requested_eager_ops(value: str) -> frozenset[str]:
    names = {n.strip() for n in value.split(",")} - {""}
    unknown = sorted(names - set(OP_NAMES) - {"all"})
    if unknown:
        raise ValueError(f"{EAGER_OPS_ENV}: unknown op name(s) {', '.join(map(repr, unknown))}; "
                         f"expected a comma list of {', '.join(OP_NAMES)} or 'all'")
    return frozenset(names)


# dynamo should not trace the environment lookup; read when a graph is traced (a change needs a new compile)
_eager_by_request = torch.compiler.assume_constant_result(eager_by_request)


# dynamo should not trace the exporter's flag; it does not change while a graph is traced
_onnx_exporting = torch.compiler.assume_constant_result(torch.onnx.is_in_onnx_export)


# what the eager formulas take on every device (torch's unfold and matmul have no float8 kernels)
EAGER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OpBackends:
    """What one op offers: its compiled op's name and the dtypes each backend takes."""

    name: str  # e.g. "soft_split"; the compiled op is t2t_kernels::<name>
    dtypes: dict = field(default_factory=dict)  # backend -> tuple of dtypes; eager takes EAGER_DTYPES
    auto_order: dict = field(default_factory=dict)  # device type -> backends "auto" tries in order
    # device type -> what "auto" tries while torch.compile traces, where inductor's code for the eager formula
    # measured faster than the kernels (empty: the eager formula); device types not named keep auto_order
    compiled_auto_order: dict = field(default_factory=dict)
    # ops this one fuses whose T2T_EAGER_OPS request covers it too (soft_split_layer_norm_linear holds
    # soft_split_layer_norm: asking that one's formula must not leave it inside the fused kernel)
    fuses: tuple = ()
    # whether the eager formula has products autocast runs in its low dtype: then "auto" leaves float32 inputs under
    # autocast (on their device) to the formula, so the result is autocast's (its dtype and its products), as the
    # eager model's; the Performer's kernels keep fp32 inside on purpose (no overflow under fp16) and do not set it
    follows_autocast: bool = False

    def unavailable_reason(self, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when `backend` can run this op on tensors of `device` and `dtype`, else why not."""
        if backend != "eager" and backend not in self.dtypes:
            return f"{self.name} has no {backend} kernel"
        dtypes = EAGER_DTYPES if backend == "eager" else self.dtypes[backend]
        if dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"dtype {dtype} is not supported by backend {backend!r} (supported: {names})"
        if backend in ("cpp", "cuda"):
            wanted = "cpu" if backend == "cpp" else "cuda"
            if device.type != wanted:
                return f"backend {backend!r} runs on {wanted} tensors, got a {device.type} tensor"
            if not EXTENSION_LOADED:
                return f"the compiled extension t2t_kernels._C is {EXTENSION_ERROR}"
            if not _kernel_registered(f"t2t_kernels::{self.name}", "CPU" if backend == "cpp" else "CUDA"):
                return f"the extension was built without {wanted.upper()} kernels for {self.name}"
        if backend == "triton":
            if _triton_error():
                return _triton_error()
            if device.type == "cuda":
                return None
            if device.type == "cpu" and triton_interpreting():
                return None
            return f"triton runs on cuda tensors (or cpu tensors under TRITON_INTERPRET=1), got {device.type}"
        return None

    def auto_candidates(self, device_type: str, compiling: bool) -> tuple[str, ...]:
        """The backends "auto" tries in order (then eager) on this device type, while torch.compile traces or not."""
        if any(_eager_by_request(name) for name in (self.name, *self.fuses)):
            return ()
        orders = self.compiled_auto_order if compiling else {}
        return orders.get(device_type, self.auto_order.get(device_type, ()))

    def resolve(self, backend: str | None, x: torch.Tensor) -> str:
        """The backend to run: the requested one (checked), or for None/"auto" the first available in auto_order.
        Every request runs the eager formula while torch.onnx.export traces: ONNX has its ops, not the kernels' custom
        ops (which compute the same function)."""
        explicit = is_explicit(backend)
        if explicit and backend not in BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {BACKENDS + ('auto', None)}, got {backend!r}")
        if _onnx_exporting():
            backend = "eager"
        elif not explicit:
            autocast_casts_x = self.follows_autocast and x.dtype == torch.float32 and autocast_enabled(x.device.type)
            candidates = () if autocast_casts_x else self.auto_candidates(x.device.type, torch.compiler.is_compiling())
            for candidate in candidates:
                if self.unavailable_reason(candidate, x.device, x.dtype) is None:
                    return candidate
            backend = "eager"
        reason = self.unavailable_reason(backend, x.device, x.dtype)
        if reason is not None:
            # "auto" falls back to eager last: when even eager cannot take the input, no backend can
            what = f"backend={backend!r} is not available" if explicit else "no backend runs this input"
            raise RuntimeError(f"{self.name}: {what}: {reason}")
        return backend

    def available(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
        device = torch.device(device)
        return [b for b in BACKENDS if self.unavailable_reason(b, device, dtype) is None]


def is_explicit(backend: str | None) -> bool:
    """Whether backend names one implementation (not None or "auto", which let each op choose)."""
    return backend is not None and backend != "auto"


def check_backend_arg(backend) -> None:
    """Fails early (at module construction) on a misspelt backend name."""
    if is_explicit(backend) and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto', None)}, got {backend!r}")

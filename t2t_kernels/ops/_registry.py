"""Small helpers the ops share for argument handling and custom-op registration."""
import math
import numbers
from contextlib import nullcontext

import torch
from torch.autograd import forward_ad


def op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def needs_eager_autodiff(*tensors) -> bool:
    """Whether an op must run its eager formula for the autodiff asked of it: forward-mode AD carries a tangent on
    one of the tensors (torch.autograd.forward_ad dual tensors), or a torch.func transform (grad, vjp, jacrev, jvp,
    jacfwd, vmap) wraps one. The compiled kernels have no forward derivative (torch.library autograd is reverse mode
    only, and without a grad-requiring input the tangent would be dropped silently), and torch.library's generated
    autograd Function has no setup_context, which the torch.func transforms require. Not checked while torch.compile
    traces."""
    if torch.compiler.is_compiling():
        return False
    if forward_ad._current_level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return False  # no dual level entered and no transform active: no tensor can carry either (the common case)
    return any(t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  or forward_ad.unpack_dual(t).tangent is not None) for t in tensors)


def grad_enabled_for_path() -> bool:
    """torch.is_grad_enabled() for a layer's choice between its inference and training paths, but False while
    torch.jit.trace records: the tracer checks its graph by tracing again under no_grad, so the graph must not
    depend on grad mode there. The inference paths' fused ops carry their own autograd: such a graph still trains."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


def has_autocast(device_type: str) -> bool:
    """Whether torch.autocast supports the device type (not meta tensors: shape inference, deferred
    initialisation). CPU and CUDA are answered first: dynamo in torch 2.6 cannot trace is_autocast_available."""
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False), or nothing for a device without autocast, whose torch.autocast
    raises."""
    return torch.autocast(device_type, enabled=False) if has_autocast(device_type) else nullcontext()


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device without autocast (where it raises)."""
    return has_autocast(device_type) and torch.is_autocast_enabled(device_type)


def is_int(value) -> bool:
    """An int, numpy's integers included (F.unfold takes them); not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_pair(value, name: str) -> tuple[int, int]:
    """int or pair of ints (numpy's too) -> (int, int), with an error that names the argument."""
    pair = (value, value) if is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(map(is_int, pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def finite_number(value) -> bool:
    """Whether value is a finite int or float (not a bool). Comparisons, not math.isfinite: under
    torch.compile(dynamic=True) a module's float attribute is a symbolic float, which they trace on; NaN fails both."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -math.inf < value < math.inf


def check_eps(eps, op: str, positive: bool = False) -> None:
    """eps must be a finite number (not a bool), >= 0 or, with positive, > 0; the error names the op and the value."""
    if not (finite_number(eps) and (0 < eps if positive else 0 <= eps)):
        raise ValueError(f"{op}: eps must be a {'positive (finite)' if positive else 'non-negative finite'} number, "
                         f"got {eps!r}")


def recompute_grads(reference, tensors, rest, grad_out, wanted) -> list:
    """The gradients of reference(*tensors, *rest) against grad_out for the tensors flagged in wanted (None for the
    others), by running the op's eager formula again under autograd. With grad mode on (create_graph: double backward)
    it runs on the tensors themselves, so the gradients' graph reaches them; otherwise on detached copies."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [t if create_graph or t is None else t.detach().requires_grad_(w) for t, w in zip(tensors, wanted)]
        out = reference(*inputs, *rest)
        grads = iter(torch.autograd.grad(out, [t for t, w in zip(inputs, wanted) if w], grad_out,
                                         create_graph=create_graph))
    return [next(grads) if w else None for w in wanted]


def register_recompute_autograd(qualname: str, reference, num_tensors: int) -> None:
    """Autograd for a forward-only fused op: backward recomputes `reference` (the op's eager formula) from the saved
    inputs and differentiates it (recompute_grads). The first num_tensors arguments are tensors, the rest plain values
    passed on to the reference."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.rest = inputs[num_tensors:]

    def grad(ctx, grad_out):
        grads = recompute_grads(reference, ctx.saved_tensors, ctx.rest, grad_out, ctx.needs_input_grad[:num_tensors])
        return (*grads, *(None for _ in ctx.rest))

    torch.library.register_autograd(qualname, grad, setup_context=setup_context)

"""Small helpers the ops share for argument handling and custom-op registration."""
import torch


def op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def to_pair(value, name: str) -> tuple[int, int]:
    """int or pair of ints -> (int, int), with an error that names the argument."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def register_recompute_autograd(qualname: str, reference, num_tensors: int) -> None:
    """Autograd for a forward-only fused op: backward recomputes `reference` (the op's eager formula) from the saved
    inputs and differentiates it. The first num_tensors arguments are tensors, the rest plain values passed on to the
    reference. With create_graph (double backward) the reference runs on the saved tensors themselves, so the
    gradient's graph reaches them."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:num_tensors])
        ctx.rest = inputs[num_tensors:]

    def grad(ctx, grad_out):
        create_graph = torch.is_grad_enabled()
        wanted = ctx.needs_input_grad[:num_tensors]
        with torch.enable_grad():
            inputs = [t if create_graph else t.detach().requires_grad_(w) for t, w in zip(ctx.saved_tensors, wanted)]
            out = reference(*inputs, *ctx.rest)
            grads = iter(torch.autograd.grad(out, [t for t, w in zip(inputs, wanted) if w], grad_out,
                                             create_graph=create_graph))
        return (*(next(grads) if w else None for w in wanted), *(None for _ in ctx.rest))

    torch.library.register_autograd(qualname, grad, setup_context=setup_context)

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

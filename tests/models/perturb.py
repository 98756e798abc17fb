"""perturbed(): model weights off their init, so that every parameter matters in a comparison."""
import torch


def perturbed(module, scale: float):
    """module with N(0, scale^2) noise added to every trainable parameter, in place (the init leaves biases zero and
    norms identity, which would hide their terms); the fixed ones (pos_embed, the Performer's w) stay."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return module

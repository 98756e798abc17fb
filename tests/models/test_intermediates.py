"""forward_intermediates / prune_intermediate_layers (timm's API for dense tasks): the blocks' outputs as token maps of
the (H/16, W/16) grid, on non-square images, in eval and in training (with checkpointing)."""
import pytest
import torch

from t2t_kernels import create_model

IMG = (32, 64)  # a 2 x 4 token grid: rows and columns cannot be confused
GRID = (IMG[0] // 16, IMG[1] // 16)


def _model(name="t2t_vit_7", **kwargs):
    torch.manual_seed(0)
    return create_model(name, img_size=IMG, num_classes=10, **kwargs).eval()


def _block_outputs(model, x):
    """Each block's output, the blocks run one after another as forward_tokens runs them."""
    outputs, tokens = [], model._embed(x)
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    return outputs


@pytest.mark.parametrize("name,backend", [("t2t_vit_7", "auto"), ("t2t_vit_7", "eager"), ("t2t_vit_t_14", "auto")])
def test_intermediates_are_the_blocks_outputs(name, backend):
    model = _model(name, backend=backend)
    x = torch.randn(3, 3, *IMG)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        expected = _block_outputs(model, x)
        assert torch.equal(final, model.forward_tokens(x))
    assert len(maps) == len(model.blocks)
    for got, tokens in zip(maps, expected):
        assert got.shape == (3, model.embed_dim, *GRID) and got.is_contiguous()
        for i in range(GRID[0]):
            for j in range(GRID[1]):  # token 1 + i * W + j is the map's pixel (i, j)
                assert torch.equal(got[:, :, i, j], tokens[:, 1 + i * GRID[1] + j])


def test_indices_formats_and_options():
    model = _model()
    depth = len(model.blocks)
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        expected = _block_outputs(model, x)
        for indices, blocks in ((2, [depth - 2, depth - 1]), ([0, -1], [0, depth - 1]), ((3, 1, 3), [1, 3]),
                                (0, []), (None, list(range(depth)))):
            maps = model.forward_intermediates(x, indices=indices, output_fmt="NLC", intermediates_only=True)
            assert len(maps) == len(blocks)
            for got, b in zip(maps, blocks):
                assert torch.equal(got, expected[b][:, 1:])
        pairs = model.forward_intermediates(x, indices=[1], norm=True, return_prefix_tokens=True,
                                            output_fmt="NLC", intermediates_only=True)
        (patches, prefix), = pairs
        normed = model.norm(expected[1])
        assert torch.equal(patches, normed[:, 1:]) and torch.equal(prefix, normed[:, :1])


def test_stop_early_runs_no_later_block():
    model = _model()
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
    x = torch.randn(1, 3, *IMG)
    with torch.no_grad():
        model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
        assert calls == [0, 1, 2]
        calls.clear()
        model.forward_intermediates(x, indices=[2], stop_early=True)  # the final tokens need every block
        assert calls == list(range(len(model.blocks)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_through_intermediates(checkpointing):
    model = _model().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, *IMG)
    weights = [torch.randn(2, model.embed_dim, *GRID) for _ in range(2)]

    def loss_of(maps):
        return sum((m * w).sum() for m, w in zip(maps, weights))

    model.set_grad_checkpointing(checkpointing)
    loss_of(model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(False)
    expected = _block_outputs(model, x)
    to_map = [expected[i][:, 1:].reshape(2, *GRID, -1).permute(0, 3, 1, 2) for i in (1, 4)]
    loss_of(to_map).backward()
    assert "blocks.4.mlp.fc2.weight" in grads and "blocks.5.mlp.fc2.weight" not in grads  # no later block is used
    for n, p in model.named_parameters():
        if n in grads:
            # other association orders of the same sums (measured: up to 4e-7 of the largest entry)
            assert (grads[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n
        else:
            assert p.grad is None or not p.grad.any(), n


def test_prune_intermediate_layers():
    model = _model()
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2], prune_norm=True) == [0, 2]
        assert len(model.blocks) == 3 and isinstance(model.norm, torch.nn.Identity)
        assert isinstance(model.head, torch.nn.Identity) and model.num_classes == 0
        after = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        for a, b in zip(before, after):
            assert torch.equal(a, b)
        final, _ = model.forward_intermediates(x, indices=[0])
        assert final.shape == (2, 1 + GRID[0] * GRID[1], model.embed_dim)
        model.reset_classifier(5)  # a head again, after the norm was pruned
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"indices": 8}, ValueError, "0 <= n <= 7"),
    ({"indices": [7]}, ValueError, r"indices \[7\] out of range for 7 blocks"),
    ({"indices": [-8]}, ValueError, "out of range"),
    ({"indices": 1.5}, TypeError, "indices must be"),
    ({"indices": [True]}, TypeError, "indices must be"),
    ({"output_fmt": "NHWC"}, ValueError, "output_fmt must be 'NCHW' or 'NLC'"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _model().forward_intermediates(torch.randn(1, 3, *IMG), **kwargs)

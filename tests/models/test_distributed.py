"""DistributedDataParallel (and FSDP2) on CPU with gloo: two ranks on halves of a batch end with the same
parameters as one process on the whole batch. FSDP2 also from a model built on the meta device (deferred
initialisation: shard, to_empty, then init_weights or the full state dict broadcast from rank 0)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import t2t_kernels

STEPS, BATCH, IMG = 3, 8, 32


def _model():
    torch.manual_seed(0)
    model = t2t_kernels.t2t_vit_7(img_size=IMG, num_classes=10)
    for m in model.modules():  # train mode with dropout off, so ranks and the reference see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 3, IMG, IMG, generator=g), torch.randint(0, 10, (STEPS, BATCH), generator=g)


def _train(model, images, labels, rank=0, world=1):
    # SGD with momentum: linear in the gradients, so fp32 rounding differences between the split and the whole batch
    # stay rounding-sized (Adam divides by sqrt(v) and turns a 1e-9 difference in a near-zero gradient into ~lr)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    share = BATCH // world
    for step in range(STEPS):
        x = images[step, rank * share:(rank + 1) * share]
        y = labels[step, rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, world, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if mode == "fsdp2-meta":
            with torch.device("meta"):
                model = _model()
        else:
            model = _model()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            wrapped = fully_shard(model)
        if mode == "fsdp2-meta":
            _materialize(model)
        _train(wrapped, *_data(), rank=rank, world=world)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _materialize(model):
    """to_empty the sharded meta model, check that init_weights gives it a sound initialisation (its draws come from
    DTensor's generator there, not a single process's), then load the reference weights from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu")
    model.init_weights()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    for name, value in full.items():
        assert torch.isfinite(value).all(), name
    w = full["tokens_to_token.attention1.w"]  # orthogonal rows scaled by sqrt(m): w w^T = m I
    torch.testing.assert_close(w @ w.T, w.shape[0] * torch.eye(w.shape[0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(full["pos_embed"], t2t_kernels.models.t2t_vit.get_sinusoid_encoding(
        *full["pos_embed"].shape[1:]), rtol=0, atol=0)
    assert torch.equal(full["norm.weight"], torch.ones_like(full["norm.weight"]))
    assert 0.015 < full["blocks.0.mlp.fc1.weight"].std() < 0.025  # trunc_normal_(std=0.02)
    reference = _model().state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, reference, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_unavailable_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard is not in this torch"
    if not hasattr(torch.cpu.Stream, "record_event"):  # what its CPU all-gather calls (absent in torch 2.6)
        return f"FSDP2 does not run on CPU in torch {torch.__version__} (torch.cpu.Stream has no record_event)"
    return None


_needs_fsdp2 = pytest.mark.skipif(_fsdp2_unavailable_reason() is not None, reason=str(_fsdp2_unavailable_reason()))


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp2", marks=_needs_fsdp2),
                                  pytest.param("fsdp2-meta", marks=_needs_fsdp2)])
def test_two_ranks_match_one_process(mode, tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    reference = _model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran single-threaded: same reduction order in the kernels
    try:
        _train(reference, *_data())
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, expected in reference.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    initial = _model().state_dict()
    moved = [n for n, p in reference.state_dict().items() if (p - initial[n]).abs().max() > 1e-3]
    assert len(moved) > len(initial) // 2, "training barely moved the parameters: the comparison would be vacuous"

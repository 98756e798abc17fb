"""CUDA-only tests (the whole model against float64, huge tensors, determinism, CUDA memory, launches from
threads). Tests marked `cuda` skip without a CUDA device; scripts/gpu_checks.sh runs this folder on a GPU machine
together with the sanitizers."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_checks.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

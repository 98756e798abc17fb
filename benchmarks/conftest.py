"""Shared pytest-benchmark set-up: device choice, synchronised timing, provider parameters, machine info in the JSON.

GPU shapes are the full T2T-ViT-14 ones (B=128, 224^2); CPU shapes are small enough to finish in minutes.
"""
import datetime
import os
import platform

import pytest
import torch

import t2t_kernels

DEVICE = torch.device(os.environ.get("T2T_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
BATCH = int(os.environ.get("T2T_BENCH_BATCH", 128 if ON_GPU else 8))


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def backend_params(op_backends, dtype, providers=("eager", "cpp", "cuda", "triton", "compile")):
    """pytest params for the providers of one op: unavailable backends are skipped with the reason."""
    params = []
    for name in providers:
        reason = None
        if name == "compile":
            reason = None
        elif name != "eager":
            reason = op_backends.unavailable_reason(name, DEVICE, dtype)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def run_timed(benchmark, fn, *args, rounds=None):
    """Warm up (compile, autotune, caches) outside the timing, then time fn(*args) ending in a device sync."""
    for _ in range(2):
        fn(*args)
    synchronize()

    def timed():
        out = fn(*args)
        synchronize()
        return out

    if rounds is None:
        return benchmark(timed)
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "device": torch.cuda.get_device_name(DEVICE) if ON_GPU else f"cpu: {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "t2t_kernels": t2t_kernels.__version__,
        "extension_loaded": t2t_kernels.ops.EXTENSION_LOADED,
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": BATCH,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    machine_info["t2t_kernels"] = info

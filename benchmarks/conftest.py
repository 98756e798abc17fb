"""Shared pytest-benchmark set-up: device choice, synchronised timing, provider parameters, machine info in the JSON.

GPU shapes are the full T2T-ViT-14 ones (B=128, 224^2); CPU shapes are small enough to finish in minutes.
The cases themselves live in t2t_kernels/bench/cases.py, shared with `python -m t2t_kernels bench`.
Environment (spelt as the CLI's options): T2T_BENCH_DEVICE, T2T_BENCH_BATCH, T2T_BENCH_IMG (224 or H,W),
T2T_BENCH_DTYPE (e.g. bf16: every case in it; unset on a GPU: bf16, and the ops with GPU kernels in fp32 too),
T2T_BENCH_MODELS (comma list), T2T_BENCH_COMPILE_BACKEND.
"""
import dataclasses
import functools
import os

import pytest
import torch

from t2t_kernels.bench import runner
from t2t_kernels.bench.cases import env_settings, op_cases

SETTINGS = env_settings()  # device, dtype, batch, image size, models of the shared cases
DEVICE, BATCH = SETTINGS.device, SETTINGS.batch
ON_GPU = DEVICE.type == "cuda"
# the dtypes of op_cases_per_dtype: the one asked for, else both of a GPU's
OP_DTYPES = (SETTINGS.dtype,) if os.environ.get("T2T_BENCH_DTYPE") or not ON_GPU else (torch.bfloat16, torch.float32)


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


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


@functools.cache
def copy_bandwidth():
    """The device's copy bandwidth, measured once per session: the roofline reference of the op rows."""
    return runner.copy_bandwidth(DEVICE)


def op_cases_per_dtype(ops, pass_):
    """The shared cases of `ops` for one pass (FORWARD or FORWARD_BACKWARD), in each of OP_DTYPES."""
    return [case for dtype in OP_DTYPES
            for case in op_cases(dataclasses.replace(SETTINGS, dtype=dtype), ops=ops, passes=(pass_,))]


def case_params(cases):
    """pytest params (case, provider) for shared cases; a provider this machine lacks is skipped with the reason."""
    return [
        pytest.param(case, p.name, id=f"{case.name.replace(' ', '_')}-{p.name}",
                     marks=[pytest.mark.skip(reason=p.reason)] if p.reason else [])
        for case in cases
        for p in case.providers()
    ]


_MEDIANS = {}  # case group -> {provider: median seconds}, for the speedup summary at the end of the session


def pytest_terminal_summary(terminalreporter):
    """Each shared case's providers against eager and against torch.compile, from the medians of this session."""
    if not _MEDIANS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"speedups (median times of this session; {DEVICE}, {torch.get_num_threads()} CPU threads)")
    for group, times in _MEDIANS.items():
        base = "eager"
        compiled = "compile" if "compile" in times else "compile-eager"
        cells = []
        for provider, t in times.items():
            ratios = ", ".join(f"{times[ref] / t:.2f}x {ref}" for ref in (base, compiled)
                               if ref in times and ref != provider)
            cells.append(f"{provider} {t * 1e3:.3f} ms" + (f" ({ratios})" if ratios else ""))
        write(f"  {group}: " + "; ".join(cells))


def run_case_benchmark(benchmark, case, provider, rounds=None, memory=True):
    """Times one provider of a shared case (warm-up outside the timing, sync inside) and records in extra_info: the
    byte floor and its fraction of the copy bandwidth (ops), images/s (models), and the memory of one more call
    (peak above the start, and for calls with a backward the activation memory held for it)."""
    benchmark.group = case.group
    workload = case.build(provider)
    run_timed(benchmark, workload, rounds=rounds)
    info = benchmark.extra_info
    info.update(provider=provider, case=case.name, dtype=str(case.settings.dtype), batch=case.settings.batch)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    floor = case.byte_floor()
    if floor:
        info["byte_floor"] = floor
        if median:
            info["bytes_per_s"] = floor / median
            info["copy_bandwidth"] = copy_bandwidth()["bytes_per_s"]
            info["bw_fraction"] = info["bytes_per_s"] / info["copy_bandwidth"]
    if median:
        _MEDIANS.setdefault(case.group, {})[provider] = median
    if case.items_per_call and median:
        info["images_per_s"] = case.items_per_call / median
    if memory:
        info["peak_bytes"] = runner.measure_memory(workload, DEVICE)[0]
        if workload.probe is not None:
            info["activation_bytes"] = runner.measure_memory(workload.probe, DEVICE, exclude_result=True)[1]
    if workload.state_bytes is not None:
        info["state_bytes"] = workload.state_bytes()
    return workload


def pytest_benchmark_update_machine_info(config, machine_info):
    info = runner.machine_info(DEVICE)
    info.update(batch=BATCH, settings=SETTINGS.describe(), copy_bandwidth=copy_bandwidth())
    machine_info["t2t_kernels"] = info

"""Runs the cases: synchronised timing, memory, the device's copy bandwidth, and the machine description.

Timing: every provider of a case is built and warmed up first (torch.compile, Triton autotuning and allocator caches
happen there, outside the timing); then the providers are timed in rounds, one call each per round, each call
ending in a device synchronisation inside the timed region. Interleaving the providers spreads slow drifts of a
shared machine's load over all of them instead of penalising whichever ran during a busy spell.

Memory, measured in one extra call after the timing (two on CPU, see below):
- ``peak_bytes``: the most memory allocated during one call above what was allocated just before it (so model
  weights and optimizer state, allocated before the step, are excluded; ``state_bytes`` gives them for train
  steps). CUDA: ``torch.cuda.max_memory_allocated``. CPU: replay of the allocator events that
  ``torch.profiler`` (``profile_memory=True``) records, i.e. every tensor allocation and free of the call (the
  second of two profiled calls: the profiler cannot size the frees of blocks allocated before it started).
- ``activation_bytes`` (calls with a backward): memory allocated by the forward and still held when it returns,
  beyond the forward's own output, i.e. what the graph keeps for backward (the metric gradient checkpointing
  reduces). Same two sources.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from ..ops._backends import triton_interpreting
from .cases import Case, Settings, skip_reason, unmeasured_memory_reason


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile of a non-empty list, q in [0, 1]."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "p20_s": percentile(times, 0.2), "p80_s": percentile(times, 0.8),
            "min_s": min(times), "reps": len(times)}


def time_call(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profile_calls(fn, device: torch.device, calls: int):
    """fn() `calls` times under torch.profiler: (the profiler, wall seconds per call, kernel seconds per call). The
    kernel time is the summed self time of the device's kernels (the ops' rows repeat their kernels' time; user
    annotations excluded), None off CUDA: the GPU's share where a wall time is the host's (launches, Python)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - start) / calls
    kernels = None
    if on_gpu:
        kernels = sum(e.self_device_time_total for e in prof.key_averages()
                      if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6 / calls
    return prof, wall, kernels


def page_faults() -> int | None:
    """This process's minor page faults so far (None where the OS does not count them). A CPU call that faults
    thousands of pages is taking back memory the allocator handed to the OS after the last call (glibc does that
    when a call's freed memory exceeds its trim threshold), which costs it time beside its arithmetic."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_round_robin(fns: dict, device: torch.device, min_reps: int = 3, max_reps: int = 50,
                     min_time: float = 1.0, tick=None) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Times each callable in rounds (one call each per round) until every one has min_reps calls and the rounds
    took min_time seconds, or max_reps rounds ran. Returns the seconds of every call, per name, and the minor page
    faults of all its calls (None where not counted)."""
    times = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    start = time.perf_counter()
    for rnd in range(max_reps):
        for name, fn in fns.items():
            before = page_faults()
            times[name].append(time_call(fn, device))
            faults[name] = None if before is None else faults[name] + page_faults() - before
        if tick:
            tick(rnd + 1)
        if rnd + 1 >= min_reps and time.perf_counter() - start >= min_time:
            break
    return times, faults


# ---- memory ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_fd2():
    """The profiler's C++ side prints status lines straight to file descriptor 2; keep them out of the report."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_SECOND_CALL = "t2t_bench: measured call"


def _cpu_memory(fn):
    """(result, peak, net): the allocator events of fn() on CPU, replayed in time order. torch.profiler drops the free
    of a block allocated before profiling began (its size is unknown to it), so a call that frees the previous call's
    tensors and allocates them anew (zero_grad(set_to_none=True), then backward) would count them as new memory: fn
    runs twice under the profiler and only the second call's events are replayed, whose frees of the first call's
    blocks are known. The numbers then mean what CUDA's do (max_memory_allocated - memory_allocated before)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # its result is dropped here, before the measured call, as between the timed calls
        with record_function(_SECOND_CALL):
            result = fn()
    events = prof.profiler.kineto_results.events()
    mark = next(e for e in events if e.name() == _SECOND_CALL)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
                    and mark.start_ns() <= e.start_ns() <= mark.end_ns())
    running = peak = 0
    for _, nbytes in memory:
        running += nbytes
        peak = max(peak, running)
    return result, peak, running


def _cuda_memory(fn, device):
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def measure_memory(fn, device: torch.device, exclude_result: bool = False) -> tuple[int, int]:
    """(peak, held): the most bytes allocated during fn() above the start, and the bytes still allocated when it
    returned while its result is alive (without the result's own storage when exclude_result: what a forward keeps
    for backward beyond its output)."""
    if device.type == "cuda":
        result, peak, net = _cuda_memory(fn, device)
    else:
        result, peak, net = _cpu_memory(fn)
    if exclude_result and torch.is_tensor(result):
        net -= result.untyped_storage().nbytes()
    del result
    return int(peak), int(max(net, 0))


# ---- copy bandwidth --------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> dict:
    """The device's achievable memory bandwidth, measured in this run: a large tensor's clone reads and writes
    nbytes each; bytes/s = 2 * nbytes / median time. The roofline reference for the op rows."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)  # far beyond the caches
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    for _ in range(2):
        x.clone()
    synchronize(device)
    times = [time_call(lambda: x.clone(), device) for _ in range(reps)]
    median = statistics.median(times)
    return {"bytes_per_s": 2 * x.numel() * 4 / median, "tensor_bytes": x.numel() * 4, "median_s": median,
            "method": "torch.clone of a float32 tensor: (read + write) bytes / median time"}


# ---- machine ---------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """The package checkout's commit (with "+changes" when its tracked files differ), or None outside a checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "csrc",
                                "t2t_kernels", "setup.py"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" +changes" if dirty else "")


def machine_info(device: torch.device) -> dict:
    import t2t_kernels

    info = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"{cpu_name()} ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "t2t_kernels": t2t_kernels.__version__,
        "extension_loaded": t2t_kernels.ops.EXTENSION_LOADED,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info["triton"], info["timm"] = _version("triton"), _version("timm")
    info["git"] = git_revision()
    if triton_interpreting():
        info["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    # the package's run-time switches (T2T_PERFORMER_SPLIT_BF16, T2T_PERFORMER_TILE, ...): what the kernels ran as
    switches = {name: value for name, value in sorted(os.environ.items()) if name.startswith("T2T_")}
    if switches:
        info["switches"] = switches
    return info


def _version(module: str) -> str | None:
    """The module's version, or None when it does not import (a broken install raises more than ImportError)."""
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001
        return None


def command_line(argv) -> str:
    return "python -m t2t_kernels bench" + ("" if not argv else " " + shlex.join(argv))


# ---- one case --------------------------------------------------------------------------------------------------
def _short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def run_case(case: Case, warmup: int = 1, min_reps: int = 3, max_reps: int = 50, min_time: float = 1.0,
             memory: bool = True, on_provider=None, tick=None) -> list[dict]:
    """Builds, warms up, times and measures every provider of a case; one result row per provider (skipped and
    failed providers included, with the reason)."""
    settings = case.settings
    device = settings.device
    rows, workloads = {}, {}
    for provider in case.providers():
        row = {"case": case.name, "group": case.group, "kind": case.kind, "provider": provider.name,
               "note": provider.note, "status": "ok", "reason": None}
        rows[provider.name] = row
        reason = skip_reason(settings, provider)
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        if on_provider:
            on_provider(provider.name)
        try:
            workload = case.build(provider.name)
            for _ in range(warmup):  # compile, autotune, allocator caches: outside the timing
                workload()
            synchronize(device)
            workloads[provider.name] = workload
        except Exception as err:  # noqa: BLE001  (one broken provider must not end the run)
            row.update(status="failed", reason=_short_error(err))
    if workloads:
        times, faults = time_round_robin(workloads, device, min_reps=min_reps, max_reps=max_reps,
                                         min_time=min_time, tick=tick)
        for name, ts in times.items():
            rows[name].update(summarize(ts))
            if device.type == "cpu" and faults[name] is not None:
                rows[name]["page_faults_per_call"] = faults[name] / len(ts)
    for name, workload in workloads.items():
        row = rows[name]
        unmeasured = unmeasured_memory_reason(settings, name)
        if memory and unmeasured:
            row["memory_error"] = unmeasured
        elif memory:
            try:
                row["peak_bytes"] = measure_memory(workload, device)[0]
                if workload.probe is not None:
                    row["activation_bytes"] = measure_memory(workload.probe, device, exclude_result=True)[1]
            except Exception as err:  # noqa: BLE001
                row["memory_error"] = _short_error(err)
        if workload.state_bytes is not None:
            row["state_bytes"] = workload.state_bytes()
    floor = case.byte_floor()
    for row in rows.values():
        if row["status"] != "ok":
            continue
        if case.items_per_call:
            row["items_per_s"] = case.items_per_call / row["median_s"]
        if floor:
            row["byte_floor"] = floor
            row["bytes_per_s"] = floor / row["median_s"]
    add_ratios(list(rows.values()), case.baseline, case.compiled_baseline)
    return list(rows.values())


def add_ratios(rows: list[dict], baseline: str, compiled_baseline: str) -> None:
    """vs_eager / vs_compile: the baseline's median time over the row's (>1: the row is faster);
    mem_vs_eager: the row's activation (else peak) memory over the baseline's."""
    by_name = {r["provider"]: r for r in rows if r["status"] == "ok"}
    for row in by_name.values():
        for key, base in (("vs_eager", baseline), ("vs_compile", compiled_baseline)):
            if base in by_name:
                row[key] = by_name[base]["median_s"] / row["median_s"]
        ref = by_name.get(baseline, {})
        for mem in ("activation_bytes", "peak_bytes"):
            if row.get(mem) and ref.get(mem):
                row[f"{mem.removesuffix('_bytes')}_vs_eager"] = row[mem] / ref[mem]


# ---- a whole run -----------------------------------------------------------------------------------------------
def count_units(cases) -> int:
    return sum(1 for c in cases for p in c.providers() if not skip_reason(c.settings, p))


def run(settings: Settings, cases: list[Case], argv=None, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
        min_time: float = 1.0, memory: bool = True, progress: bool = True, reset_dynamo: bool = True,
        bandwidth_bytes: int | None = None, on_case=None) -> dict:
    """Runs every case; returns the result document (the JSON): meta, copy bandwidth, rows, targets.
    on_case(partial document) after each case (its meta says "partial": "done/total cases"), so that a run cut
    short by a time limit (a lent GPU's) keeps what it measured."""
    from tqdm import tqdm

    meta = machine_info(settings.device)
    meta["command"] = command_line(argv)
    meta["argv"] = list(argv or [])
    meta["settings"] = settings.describe()
    meta["timing"] = {"warmup": warmup, "min_reps": min_reps, "max_reps": max_reps, "min_time_s": min_time,
                      "statistic": "median of per-call times (p20/p80 given); providers interleaved per round"}
    rows = []
    run_start = time.perf_counter()
    with tqdm(total=count_units(cases) + 1, desc="copy bandwidth", disable=not progress, unit="provider",
              dynamic_ncols=True, file=sys.stderr) as bar:
        bandwidth = copy_bandwidth(settings.device, bandwidth_bytes)
        bar.update()
        for done, case in enumerate(cases, 1):
            if reset_dynamo:
                torch._dynamo.reset()  # each case compiles its own graphs; do not let earlier ones pile up
            start = time.perf_counter()

            def on_provider(name, case=case):
                bar.set_description(f"{case.name} [{name}]")
                bar.set_postfix_str("build + warm-up")
                bar.update()

            def tick(rounds):
                bar.set_postfix_str(f"timing round {rounds}")

            case_rows = run_case(case, warmup=warmup, min_reps=min_reps, max_reps=max_reps, min_time=min_time,
                                 memory=memory, on_provider=on_provider, tick=tick)
            for row in case_rows:
                if "bytes_per_s" in row:
                    row["bw_fraction"] = row["bytes_per_s"] / bandwidth["bytes_per_s"]
                row["case_wall_s"] = time.perf_counter() - start
            rows += case_rows
            if on_case is not None:
                partial = {"meta": {**meta, "partial": f"{done}/{len(cases)} cases"},
                           "copy_bandwidth": bandwidth, "rows": rows}
                partial["targets"] = targets(partial)
                on_case(partial)
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta["wall_s"] = time.perf_counter() - run_start
    result = {"meta": meta, "copy_bandwidth": bandwidth, "rows": rows}
    result["targets"] = targets(result)
    return result


# ---- issue targets ---------------------------------------------------------------------------------------------
def _row(rows, case, provider):
    return next((r for r in rows if r["case"] == case and r["provider"] == provider and r["status"] == "ok"), None)


def targets(result: dict) -> list[dict]:
    """The project's performance targets, checked on whatever of them this run measured (issue 5, item 8; issue 6,
    item 2). Each entry: what, the measured ratio, the goal, met, and the conditions the goal was set for."""
    rows, s = result["rows"], result["meta"]["settings"]
    out = []
    cpu = s["device"].startswith("cpu")
    cond = (s["batch"] == 8 and s["dtype"] == "float32" and s["img_size"] == [224, 224]) if cpu else (
        s["batch"] == 128 and s["dtype"] == "bfloat16" and s["img_size"] == [224, 224])
    conditions = "CPU, fp32, B=8, 224x224" if cpu else "GPU (H100), bf16 autocast, B=128, 224x224"

    def add(what, num, den, goal, invert=False):
        if num is None or den is None:
            return
        ratio = (den["median_s"] / num["median_s"]) if not invert else None
        if invert:  # memory: ours over the baseline's, lower is better
            ours, base = num.get("_mem"), den.get("_mem")
            if not ours or not base:
                return
            ratio = ours / base
        met = ratio <= goal if invert else ratio >= goal
        out.append({"target": what, "ratio": ratio, "goal": ("<= " if invert else ">= ") + f"{goal:g}", "met": met,
                    "conditions": conditions, "conditions_match": cond})

    def best(case, providers):
        cands = [r for p in providers if (r := _row(rows, case, p))]
        return min(cands, key=lambda r: r["median_s"]) if cands else None

    t2t, vit14 = "t2t_vit_14.tokens_to_token", "t2t_vit_14"
    if cpu:
        add(f"{t2t} forward: fused vs eager", _row(rows, f"{t2t}/forward", "fused"),
            _row(rows, f"{t2t}/forward", "eager"), 2.0)
        add(f"{vit14} forward: fused vs eager", _row(rows, f"{vit14}/forward", "fused"),
            _row(rows, f"{vit14}/forward", "eager"), 1.2)
    else:
        case = f"{vit14}/train step"
        ours = best(case, ("fused", "compile-fused"))
        add(f"{vit14} train step: best of fused/compile-fused vs eager", ours, _row(rows, case, "eager"), 1.6)
        add(f"{vit14} train step: best of fused/compile-fused vs compile-eager", ours,
            _row(rows, case, "compile-eager"), 1.15)
        fused, eager = _row(rows, case, "fused"), _row(rows, case, "eager")
        if fused and eager and fused.get("peak_bytes") and eager.get("peak_bytes"):
            # peak train memory as a whole: weights + grads + optimizer state + the step's own peak
            fused, eager = dict(fused), dict(eager)
            for r in (fused, eager):
                r["_mem"] = r["peak_bytes"] + r.get("state_bytes", 0)
            add(f"{vit14} peak train memory (state + step peak): fused vs eager", fused, eager, 0.6, invert=True)
        vit = best("timm.vit_small_patch16_224/train step", ("eager", "compile-eager"))
        add(f"{vit14} train step: best of fused/compile-fused vs timm vit_small_patch16_224 (best of eager/compile)",
            ours, vit, 0.95)
    return out

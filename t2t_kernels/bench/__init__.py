"""Benchmarks of the fused ops and the models: cases shared by the CLI and the pytest-benchmark suites (cases.py),
synchronised interleaved timing, memory and copy bandwidth (runner.py), table / markdown / plot (report.py), and
the `python -m t2t_kernels bench` command (cli.py)."""
from .cases import Settings, all_cases, env_settings, model_cases, op_cases
from .runner import copy_bandwidth, machine_info, measure_memory, run, run_case

__all__ = ["Settings", "all_cases", "env_settings", "model_cases", "op_cases", "copy_bandwidth", "machine_info",
           "measure_memory", "run", "run_case"]

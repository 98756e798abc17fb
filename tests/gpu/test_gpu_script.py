"""What of scripts/gpu_checks.sh can be checked without a GPU: it parses, it refuses clearly where there is no CUDA
device, and its sanitizer workload (the same cases, on the CPU backends) runs and matches the references."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sanitizer_workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "scripts", name) for name in ("gpu_checks.sh", "gpu_session.sh")]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None, reason="checks the no-GPU path")
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_refuses_without_a_gpu(tmp_path, script):
    result = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1
    assert "no CUDA device visible" in result.stderr


@pytest.mark.parametrize("op", ["soft_split", "performer_attention"])
def test_workload_cases_pass_on_the_cpu_backends(op, capsys):
    backends = "eager,cpp"
    assert sanitizer_workload.main(["--op", op, "--backends", backends, "--dtypes", "float32,bfloat16",
                                    "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"ok       {op:<20} eager" in out

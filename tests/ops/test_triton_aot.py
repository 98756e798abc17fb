"""The Triton kernels compile for the H100 (sm_90), and for consumer GPUs' smaller shared memory, without a GPU: scripts/triton_aot_check.py records every launch of
the ops' Triton wrappers at T2T-ViT's shapes and compiles each ahead of time through ptxas (Triton's own), checking
for compile errors, shared memory over the limit and register spills beyond a few registers' worth in the model's
launches. The interpreter tests cannot see these: the interpreter runs the kernels as Python (it accepted a
plain-string global inside a kernel that the compiler rejects). Runs in a subprocess without TRITON_INTERPRET, which
this test session sets."""
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "triton_aot_check.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

def _aot_api_reason():
    """Why the script cannot run on this Triton (it drives Triton's compiler internals), or None."""
    if not PTXAS.exists():
        return f"Triton's ptxas is not installed ({PTXAS})"
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return f"triton {triton.__version__}'s ASTSource predates the script's (no constexprs argument)"
    return None


pytestmark = pytest.mark.skipif(_aot_api_reason() is not None, reason=str(_aot_api_reason()))


def run_python(args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900, **kwargs)


def test_every_launch_compiles_for_sm90_without_register_pressure():
    # bf16 (the GPU training dtype) and fp32; fp16 lowers like bf16 (the full run: all three, about 40 s here)
    result = run_python([str(SCRIPT), "--arch", "90", "--dtypes", "bfloat16,float32"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "0 launches failed" in summary, summary
    compiled = int(summary.split()[0])
    # per dtype: the soft split's 2 geometries (stages 1 and 2 share one) x (forward, 2 backward layouts) x 9 autotune
    # configs, the fused norm's 2 kernels per geometry, the Performer's 4 kernels at 3 widths: 70 distinct kernels,
    # plus 18 for the bf16 norm's fp32 token gradient folded into a bf16 image gradient
    assert compiled >= 150, summary
    for kernel in ("_soft_split_fwd_kernel", "_soft_split_bwd_kernel", "_forward_kernel", "_backward_kernel",
                   "_performer_fwd_state_kernel", "_performer_fwd_output_kernel", "_performer_bwd_query_kernel",
                   "_performer_bwd_key_value_kernel"):
        assert f" {kernel} " in result.stdout, kernel


@pytest.mark.parametrize("arch", [86, 120])
def test_every_launch_compiles_for_consumer_gpus(arch):
    """sm_86/89 (RTX 30xx/40xx) and sm_120 (RTX 50xx, through Triton's Blackwell ptxas) give a block 99 KB of shared
    memory against the H100's 227 KB. fp32: its tiles take the most."""
    if arch >= 100 and not PTXAS.with_name("ptxas-blackwell").exists():
        pytest.skip(f"this Triton bundles no Blackwell ptxas ({PTXAS.with_name('ptxas-blackwell')})")
    result = run_python([str(SCRIPT), "--arch", str(arch), "--dtypes", "float32"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert f"compiled for cuda:{arch}" in summary and "0 launches failed" in summary, summary
    assert int(summary.split()[0]) >= 70, summary


def test_the_check_reports_a_kernel_the_compiler_rejects(tmp_path):
    """A kernel reading a non-constexpr global (the bug the check found in the Performer kernels) fails to compile,
    and the check says why instead of passing it."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        PRECISION = "ieee"

        @triton.jit
        def bad(x_ptr, y_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            a = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
            tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a, input_precision=PRECISION))
    '''))
    code = textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(SCRIPT.parent)!r}]
        import triton
        from triton.backends.compiler import GPUTarget
        import bad_kernel, triton_aot_check
        row = triton_aot_check.compile_one(bad_kernel.bad, {{"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}},
                                           {{"BLOCK": 16}}, {{"num_warps": 4}}, GPUTarget("cuda", 90, 32),
                                           {str(PTXAS)!r}, 90)
        print(row["error"])
    ''')
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global variable PRECISION" in result.stdout, result.stdout[-3000:]

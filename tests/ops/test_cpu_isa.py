"""The Performer CPU kernel (and the fused soft split + LayerNorm's per-token loops and its product with a Linear,
the post-attention kernel's tiles, norm and GELU, and the softmax attention's transposes and softmax) picks AVX-512,
AVX2 or plain code when the extension loads; CI machines run only the best one the CPU has. T2T_CPU_ISA forces the
narrower paths, so each is checked against the float64 reference too (in a subprocess: the choice is made once per
process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2t_kernels.ops.performer_attention import BACKENDS


SUITES = {  # the kernels built per instruction set, and the tests that check them
    "performer_attention": ("test_performer_attention.py", "cpp and (float64_reference or gradcheck or deterministic)"),
    "soft_split_layer_norm": ("test_soft_split_layer_norm.py", "cpp and (float64 or deterministic)"),
    "soft_split_layer_norm_linear": ("test_soft_split_layer_norm_linear.py", "cpp and (float64 or deterministic)"),
    "post_attention": ("test_post_attention.py", "cpp and (float64 or deterministic or gelu)"),
    "softmax_attention": ("test_softmax_attention.py", "cpp and (float64 or deterministic)"),
}


@pytest.mark.skipif(BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is not None,
                    reason="the cpp backend is not built")
@pytest.mark.parametrize("op", SUITES)
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_narrower_instruction_sets_match_the_reference(isa, op):
    name, selection = SUITES[op]
    suite = Path(__file__).with_name(name)
    env = dict(os.environ, T2T_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
         "-k", selection],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]

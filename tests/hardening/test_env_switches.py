"""The run-time switches (README, Build switches): every on/off variable reads the same spellings
through _env.env_flag (C++: onednn_linear.h for T2T_ONEDNN), and a value it cannot read is an error that names the
variable, never a silent guess (T2T_ONEDNN=false used to mean on). T2T_CPU_ISA too, in a subprocess (the
instruction set is picked once per process)."""
import os
import subprocess
import sys

import pytest
import torch

from t2t_kernels import _extension
from t2t_kernels._env import OFF, ON, env_flag
from t2t_kernels.layers.recompute import recompute_pairs_enabled
from t2t_kernels.models.t2t_vit import register_with_timm
from t2t_kernels.ops import POST_ATTENTION_BACKENDS
from t2t_kernels.ops._onednn import ONEDNN_LINEAR_REGISTERED, intel_cpu, onednn_wanted

NAME = "T2T_TEST_SWITCH"


@pytest.mark.parametrize("default", [False, True])
def test_env_flag_spellings(default, monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_flag(NAME, default) is default
    for value, want in [("", default), ("  ", default), *((v, False) for v in OFF), *((v, True) for v in ON),
                        ("FALSE", False), (" On ", True), ("Yes\n", True)]:
        monkeypatch.setenv(NAME, value)
        assert env_flag(NAME, default) is want, value


@pytest.mark.parametrize("value", ["2", "-1", "maybe", "enabled", "0 1", "nein"])
def test_env_flag_rejects_what_it_cannot_read(value, monkeypatch):
    monkeypatch.setenv(NAME, value)
    with pytest.raises(ValueError, match=rf"{NAME} must be one of .* got {value!r}"):
        env_flag(NAME, True)


def _triton_split_bf16():
    pytest.importorskip("triton")
    from t2t_kernels.ops.performer_attention.triton import _launch_config

    return _launch_config(2, 64, 64, 32, torch.bfloat16)[3]["SPLIT"]


def _triton_autotuning():
    pytest.importorskip("triton")
    from t2t_kernels.ops.soft_split.triton import autotuning

    return autotuning()


def _extension_disabled():
    return _extension._load()[0] is None


def _timm_skipped():
    return register_with_timm() is False


# (variable, what reads it, the value that read gives for "off" and for "on")
READERS = [
    ("T2T_ONEDNN", onednn_wanted, False, True),
    ("T2T_RECOMPUTE_PAIRS", recompute_pairs_enabled, False, True),
    ("T2T_PERFORMER_SPLIT_BF16", _triton_split_bf16, False, True),
    ("T2T_TRITON_AUTOTUNE", _triton_autotuning, False, True),
    ("T2T_KERNELS_DISABLE_EXT", _extension_disabled, None, True),
    ("T2T_KERNELS_NO_TIMM", _timm_skipped, None, True),
]


@pytest.mark.parametrize("name,read,off,on", READERS, ids=[r[0] for r in READERS])
def test_every_switch_reads_alike(name, read, off, on, monkeypatch):
    """Off and on in two spellings each where the answer does not depend on the machine (None: skipped), and an
    unreadable value a ValueError naming the variable."""
    for spelling in ("0", "Off") if off is not None else ():
        monkeypatch.setenv(name, spelling)
        assert read() is off, spelling
    for spelling in ("1", " yes "):
        monkeypatch.setenv(name, spelling)
        assert read() is on, spelling
    monkeypatch.setenv(name, "sometimes")
    with pytest.raises(ValueError, match=rf"{name} must be one of .* got 'sometimes'"):
        read()


def _wide_post_attention():
    """The C++ post_attention on weights above its wide bound (its products through oneDNN where that is on):
    how many oneDNN linears it ran."""
    from t2t_kernels.ops import post_attention

    generator = torch.Generator().manual_seed(7)
    M, D, E, H = 12, 8, 6, 30000
    params = [torch.randn(E, D, generator=generator), torch.randn(E, generator=generator), torch.ones(E),
              torch.zeros(E), torch.randn(H, E, generator=generator), torch.randn(H, generator=generator),
              torch.randn(E, H, generator=generator), torch.randn(E, generator=generator)]
    with torch.profiler.profile() as prof, torch.inference_mode():
        post_attention(torch.randn(M, D, generator=generator), torch.randn(M, E, generator=generator), *params,
                       backend="cpp")
    return [event.key for event in prof.events()].count("mkldnn::_linear_pointwise")


needs_cpp_onednn = pytest.mark.skipif(
    POST_ATTENTION_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is not None
    or not (ONEDNN_LINEAR_REGISTERED and torch.backends.mkldnn.is_available()),
    reason="needs the compiled post_attention and torch's oneDNN linear")


@needs_cpp_onednn
@pytest.mark.parametrize("value,want", [(None, None), ("", None), ("OFF", 0), (" no ", 0), ("True", 3), ("on", 3)])
def test_cpp_reads_t2t_onednn_alike(value, want, monkeypatch):
    """The extension's reading of T2T_ONEDNN (csrc/cpu/onednn_linear.h) takes the same spellings: three oneDNN
    products on, none off; unset or empty the vendor default (off on Intel CPUs)."""
    if value is None:
        monkeypatch.delenv("T2T_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("T2T_ONEDNN", value)
    assert _wide_post_attention() == (3 * (not intel_cpu()) if want is None else want)


@needs_cpp_onednn
def test_cpp_rejects_an_unreadable_t2t_onednn(monkeypatch):
    monkeypatch.setenv("T2T_ONEDNN", "perhaps")
    with pytest.raises(RuntimeError, match="T2T_ONEDNN must be one of .* got 'perhaps'"):
        _wide_post_attention()


@pytest.mark.skipif(POST_ATTENTION_BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32) is not None,
                    reason="needs the compiled post_attention")
def test_unknown_cpu_isa_is_an_error():
    """T2T_CPU_ISA takes avx512, avx2 or plain: another value fails the first kernel call with a message naming it
    (in a fresh process, where the instruction set is not picked yet)."""
    code = ("import torch, t2t_kernels\n"
            "E = 8\n"
            "p = [torch.randn(E, E), torch.randn(E), torch.ones(E), torch.zeros(E)] + [torch.randn(E, E), "
            "torch.randn(E)] * 2\n"
            "torch.ops.t2t_kernels.post_attention(torch.randn(5, E), torch.randn(5, E), *p, 1e-5)\n")
    for value, ok in (("sse", False), ("avx512", True)):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "T2T_CPU_ISA": value},
                                capture_output=True, text=True, timeout=300)
        if ok:
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            assert result.returncode != 0
            assert "T2T_CPU_ISA must be avx512, avx2 or plain" in result.stderr and "'sse'" in result.stderr


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("On", True), ("y", True), ("0", False),
                                        ("false", False), ("off", False), ("no", False), ("", False), ("2", False)])
def test_triton_interpret_read_as_triton_reads_it(value, want, monkeypatch):
    """TRITON_INTERPRET is triton's switch: read with its spellings ("false" is off), so a CPU tensor under
    TRITON_INTERPRET=false gets this package's error, not the launcher's "0 active drivers"."""
    from t2t_kernels.ops._backends import triton_interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() is want
    from t2t_kernels.ops import SOFT_SPLIT_BACKENDS

    reason = SOFT_SPLIT_BACKENDS.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    if want or "triton is not importable" in (reason or ""):
        assert reason is None or "triton is not importable" in reason
    else:
        assert "TRITON_INTERPRET=1" in reason
    try:
        from triton._C.libtriton import getenv_bool
    except ImportError:
        return
    assert getenv_bool("TRITON_INTERPRET", False) is want

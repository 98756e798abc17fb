"""The benchmark harness itself (t2t_kernels/bench, `python -m t2t_kernels bench`): it runs on tiny sizes, writes valid
JSON, markdown and a PNG, skips a provider this machine lacks with the reason, reports a broken provider without
stopping, measures memory, and keeps one BENCHMARKS.md section per command and device."""
import json
import os
import re

import pytest
import torch

from t2t_kernels.__main__ import main
from t2t_kernels.bench import report, runner
from t2t_kernels.bench.cases import (FORWARD, FORWARD_BACKWARD, TRAIN_STEP, Case, ModelCase, Provider, Settings,
                                     Workload, op_cases)
from t2t_kernels.ops._backends import OpBackends

TINY = dict(device=torch.device("cpu"), batch=1, img_size=(32, 32), models=("t2t_vit_7",))
FAST = dict(warmup=1, min_reps=1, max_reps=1, min_time=0.0)
CPU = torch.device("cpu")
# a tiny model-case run: T2T-ViT-7 forward at B=1, 32x32, eager only, no memory, one call
TINY_RUN = ["bench", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1", "--no-ops", "--no-memory",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-progress", "--bandwidth-mb", "1",
            "--cases", "t2t_vit_7/forward", "--providers", "eager"]


def exit_status(argv, capsys):
    """main(argv)'s exit status (argparse's SystemExit included) and its stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_cli_bench_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1", "--no-compile", "--warmup", "1",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-progress", "--out", str(out),
            "--ops", "performer_attention", "--bandwidth-mb", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "x eager" in printed and "copy bandwidth" in printed and "t2t_vit_7 train step" in printed
    assert "skipped cuda (4 cases): backend 'cuda' runs on cuda tensors" in printed  # listed once, with the reason

    result = json.loads((out / "results.json").read_text())
    meta = result["meta"]
    for key in ("device_name", "torch", "triton", "cuda", "t2t_kernels", "date", "command"):
        assert key in meta, key
    assert meta["command"].startswith("python -m t2t_kernels bench --model t2t_vit_7")
    assert "--out" not in meta["command"] and "--no-progress" not in meta["command"]
    assert result["copy_bandwidth"]["bytes_per_s"] > 0

    rows = {(r["case"], r["provider"]): r for r in result["rows"]}
    eager = rows[("performer_attention/stage1/forward", "eager")]
    assert eager["status"] == "ok" and eager["median_s"] > 0 and eager["vs_eager"] == 1.0
    assert 0 < eager["bw_fraction"] and eager["byte_floor"] == 4 * 1 * 64 * 64 * 4  # q, k, v, y at T=64, fp32
    assert rows[("performer_attention/stage1/forward", "compile")]["status"] == "skipped"
    cuda = rows[("performer_attention/stage1/forward+backward", "cuda")]
    assert cuda["status"] == "skipped" and "cuda" in cuda["reason"]
    train = rows[("t2t_vit_7/train step", "fused")]
    assert train["items_per_s"] > 0 and train["activation_bytes"] > 0 and train["state_bytes"] > 0
    # the step's peak above its start: the gradients it frees and allocates again are not new memory (they were
    # a quarter of the state, params + grads + AdamW's two moments, when the CPU peak counted them)
    assert 0 < train["peak_bytes"] < train["state_bytes"] / 16
    ckpt = rows[("t2t_vit_7/train step", "fused+ckpt")]
    assert ckpt["activation_bytes"] < train["activation_bytes"]  # checkpointing keeps less for backward
    assert not [r for r in result["rows"] if r["status"] == "failed"]

    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert f"`{meta['command']}`" in md and "| t2t_vit_7 train step" in md
    assert "- skipped compile-eager (4 cases): torch.compile providers are off (--no-compile)" in md


def test_triton_interpreter_and_missing_backends_are_skipped_with_a_reason(monkeypatch):
    """tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines: triton "runs" on CPU tensors there, but the
    interpreter is not timed. A backend whose kernels are missing is skipped with the op's own reason."""
    from t2t_kernels.ops.performer_attention import BACKENDS

    def no_cpp(self, backend, device, dtype):
        return "the extension was built without CPU kernels (simulated)" if backend == "cpp" else original(
            self, backend, device, dtype)

    original = OpBackends.unavailable_reason
    monkeypatch.setattr(OpBackends, "unavailable_reason", no_cpp)
    assert BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32)
    case = op_cases(Settings(**TINY, compile=False), ops=("performer_attention",), passes=(FORWARD,))[0]
    rows = {r["provider"]: r for r in runner.run_case(case, memory=False, **FAST)}
    assert rows["cpp"]["status"] == "skipped" and "simulated" in rows["cpp"]["reason"]
    assert rows["triton"]["status"] == "skipped" and rows["triton"]["reason"]
    assert rows["compile"]["status"] == "skipped" and "--no-compile" in rows["compile"]["reason"]
    assert rows["eager"]["status"] == "ok"


def test_compile_provider_and_soft_split_case():
    case = op_cases(Settings(**TINY, compile_backend="eager"), ops=("soft_split",), passes=(FORWARD_BACKWARD,))[1]
    assert case.name == "soft_split/stage1/forward+backward"
    rows = {r["provider"]: r for r in runner.run_case(case, **FAST)}
    assert rows["compile"]["status"] == "ok" and rows["compile"]["vs_compile"] == 1.0
    # stage1 at 32x32: tokens (1, 64, 64) as an 8x8 image; out (1, 16, 576); forward and backward each move x + out
    assert rows["eager"]["byte_floor"] == 2 * 4 * (64 * 64 + 16 * 576)
    assert rows["eager"]["activation_bytes"] == rows["compile"]["activation_bytes"] == 0  # unfold keeps nothing


def test_performer_activation_memory_is_the_small_state():
    """The official formula keeps phi(q), phi(k) (B, T, m) for backward; the kernels keep only A (m, E) and s (m)."""
    from t2t_kernels.ops.performer_attention import BACKENDS

    if BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32):
        pytest.skip(BACKENDS.unavailable_reason("cpp", torch.device("cpu"), torch.float32))
    case = op_cases(Settings(**TINY, compile=False), ops=("performer_attention",), passes=(FORWARD_BACKWARD,))[0]
    rows = {r["provider"]: r for r in runner.run_case(case, **FAST)}
    assert rows["cpp"]["activation_bytes"] == pytest.approx(4 * (32 * 64 + 32), abs=512)
    assert rows["eager"]["activation_bytes"] > 4 * rows["cpp"]["activation_bytes"]


class _BrokenCase(Case):
    def __init__(self):
        super().__init__(Settings(**TINY), "broken/forward", "broken forward")

    def providers(self):
        return [Provider("eager"), Provider("boom"), Provider("absent", reason="not on this machine")]

    def build(self, provider):
        if provider == "boom":
            raise RuntimeError("kernel exploded\nsecond line")
        return Workload(lambda: torch.ones(8).sum())


def test_a_failing_provider_is_reported_and_the_rest_still_run():
    rows = {r["provider"]: r for r in runner.run_case(_BrokenCase(), **FAST)}
    assert rows["eager"]["status"] == "ok"
    assert rows["boom"] == {**rows["boom"], "status": "failed", "reason": "RuntimeError: kernel exploded"}
    assert rows["absent"]["status"] == "skipped"


def test_cpu_memory_counts_what_a_call_allocates_and_keeps():
    nbytes = 1 << 22

    def make():
        scratch = torch.ones(nbytes // 4)  # freed before returning: peak only
        return torch.zeros(nbytes // 4) + scratch.sum()

    peak, held = runner.measure_memory(make, torch.device("cpu"))
    assert held == pytest.approx(nbytes, rel=0.01)
    assert peak >= 2 * nbytes


@pytest.mark.skipif(runner.page_faults() is None, reason="this OS does not count page faults")
def test_page_faults_are_counted_per_provider():
    """A call that writes a fresh 64 MB tensor faults its pages in (4 KB pages: 16384; even 2 MB ones: 32); one
    that reuses its buffer, nearly none. The rows report the faults per call; the report names the heavy ones."""
    reused = torch.empty(1 << 24)
    fns = {"fresh": lambda: torch.empty(1 << 24).fill_(1.0), "reused": lambda: reused.fill_(1.0)}
    times, faults = runner.time_round_robin(fns, torch.device("cpu"), min_reps=3, max_reps=3, min_time=0.0)
    assert len(times["fresh"]) == 3 and faults["fresh"] >= 3 * 32 > faults["reused"]

    result = _synthetic_result("python -m t2t_kernels bench", 0.5)
    assert not report.page_fault_lines(result)
    result["rows"][0]["page_faults_per_call"] = 12345.0
    result["rows"][1]["page_faults_per_call"] = 10.0
    assert report.page_fault_lines(result) == [
        "page faults per call above 1000 (memory the allocator returned to the OS after the last call and takes "
        "back; part of the row's time, see README, Benchmarks): t2t_vit_14.tokens_to_token forward eager 12.3k"]
    case = ModelCase(Settings(**TINY, compile=False), "t2t_vit_7", "t2t_module", FORWARD)
    rows = runner.run_case(case, memory=False, **FAST)
    timed = [r for r in rows if r["status"] == "ok"]
    assert [r["provider"] for r in timed] == ["eager", "fused"]
    assert all(r["page_faults_per_call"] >= 0 for r in timed)


def test_record_keeps_one_section_per_command_and_device(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n\n<!-- bench-runs: new runs are added below -->\n")
    result = _synthetic_result("python -m t2t_kernels bench", 0.5)
    report.record(str(path), result)
    report.record(str(path), _synthetic_result("python -m t2t_kernels bench", 0.25), note="rerun")
    report.record(str(path), _synthetic_result("python -m t2t_kernels bench --batch 2", 0.5))
    # the same command under other run-time switches (one side of an A/B pair) is a section of its own, twice
    for _ in range(2):
        switched = _synthetic_result("python -m t2t_kernels bench", 0.5)
        switched["meta"]["switches"] = {"T2T_RECOMPUTE_PAIRS": "0"}
        report.record(str(path), switched)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- bench-run: ") == 3
    assert "<!-- bench-run: python -m t2t_kernels bench [T2T_RECOMPUTE_PAIRS=0] @ " in text
    assert "rerun" in text and "| 2.00 |" in text  # the rerun replaced the first section (x eager 1/0.25 / 2)
    assert "`python -m t2t_kernels bench --batch 2`" in text


def test_targets_and_ratios_from_rows():
    result = _synthetic_result("python -m t2t_kernels bench", 0.5)
    text = report.text_table(result)
    assert "MET  t2t_vit_14.tokens_to_token forward: fused vs eager: 2.00" in text
    assert result["targets"][0]["conditions_match"]


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--img-size", "100", "--no-progress"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "resnet50"])


def _synthetic_result(command, fused_s):
    rows = [{"case": "t2t_vit_14.tokens_to_token/forward", "group": "t2t_vit_14.tokens_to_token forward",
             "kind": "model", "provider": p, "note": "", "status": "ok", "reason": None, "median_s": t, "p20_s": t,
             "p80_s": t, "min_s": t, "reps": 3, "items_per_s": 8 / t}
            for p, t in (("eager", 1.0), ("fused", fused_s))]
    runner.add_ratios(rows, "eager", "compile-eager")
    meta = {"command": command, "device_name": "test cpu", "torch": torch.__version__, "triton": None, "cuda": None,
            "t2t_kernels": "0", "extension_loaded": True, "python": "3", "date": "2026-01-01T00:00:00+00:00",
            "settings": {"device": "cpu", "dtype": "float32", "batch": 8, "img_size": [224, 224],
                         "compile_backend": "inductor"}}
    result = {"meta": meta, "copy_bandwidth": {"bytes_per_s": 1e10, "tensor_bytes": 1 << 28, "method": "clone"},
              "rows": rows}
    result["targets"] = runner.targets(result)
    return result


def test_model_case_providers_follow_settings():
    names = [p.name for p in ModelCase(Settings(**TINY), "t2t_vit_7", "model", TRAIN_STEP).providers()]
    assert names == ["eager", "fused", "compile-eager", "compile-fused", "eager+ckpt", "fused+ckpt"]
    skipped = {p.name: p.reason for p in ModelCase(Settings(**TINY, compile=False, checkpointing=False), "t2t_vit_7",
                                                   "model", FORWARD).providers() if p.reason}
    assert set(skipped) == {"compile-eager", "compile-fused"}


def test_timm_reference_case_with_a_stub_timm(monkeypatch):
    """The GPU runs add timm's vit_small_patch16_224; here a stub module stands in for timm (not a dependency)."""
    import sys
    import types

    from t2t_kernels.bench.cases import TimmCase

    class TinyViT(torch.nn.Module):
        num_classes = 10

        def __init__(self, img_size):
            super().__init__()
            self.img_size, self.checkpointing = img_size, False
            self.fc = torch.nn.Linear(3 * img_size[0] * img_size[1], 10)

        def set_grad_checkpointing(self, enable=True):
            self.checkpointing = enable

        def forward(self, x):
            return self.fc(x.flatten(1))

    stub = types.ModuleType("timm")
    stub.create_model = lambda name, pretrained=False, img_size=224: TinyViT(img_size)
    monkeypatch.setitem(sys.modules, "timm", stub)
    case = TimmCase(Settings(**TINY, compile=False, timm=True), TRAIN_STEP)
    assert case.name == "timm.vit_small_patch16_224/train step"
    rows = {r["provider"]: r for r in runner.run_case(case, memory=False, **FAST)}
    assert rows["eager"]["status"] == "ok" and rows["eager+ckpt"]["status"] == "ok"
    assert rows["compile-eager"]["status"] == "skipped"

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert all(p.reason and "timm" in p.reason for p in TimmCase(Settings(**TINY), FORWARD).providers())


def test_gpu_targets_from_rows():
    def row(case, provider, t, peak=None):
        return {"case": case, "provider": provider, "status": "ok", "median_s": t, "peak_bytes": peak,
                "state_bytes": 100}

    train = "t2t_vit_14/train step"
    rows = [row(train, "eager", 1.0, 1000), row(train, "fused", 0.5, 500), row(train, "compile-eager", 0.6),
            row(train, "compile-fused", 0.55), row("timm.vit_small_patch16_224/train step", "compile-eager", 0.45)]
    meta = {"settings": {"device": "cuda", "dtype": "bfloat16", "batch": 128, "img_size": [224, 224]}}
    got = {t["target"].split(":")[1].strip(): t for t in runner.targets({"meta": meta, "rows": rows})}
    assert got["best of fused/compile-fused vs eager"]["ratio"] == pytest.approx(2.0)
    assert got["best of fused/compile-fused vs compile-eager"]["ratio"] == pytest.approx(1.2)
    assert got["fused vs eager"]["ratio"] == pytest.approx(600 / 1100) and got["fused vs eager"]["met"]
    timm = next(t for t in got.values() if "timm" in t["target"])
    assert timm["ratio"] == pytest.approx(0.9) and not timm["met"] and timm["conditions_match"]


def provider_outputs(case):
    """One call's output of each provider of an op case that runs here (compile aside), each built from the same
    seed: the same inputs (and nn.Linear weights) for every provider."""
    outputs = {}
    for provider in case.providers():
        if provider.reason is None and provider.name != "compile":
            torch.manual_seed(0)
            outputs[provider.name] = case.build(provider.name)()
    return outputs


def test_soft_split_layer_norm_case_providers_agree():
    """The split + LayerNorm pair (what a fused op would replace): every provider computes the same tokens, and its
    byte floor is the plain soft split's."""
    settings = Settings(**TINY, compile=False)
    pairs = op_cases(settings, ops=("soft_split+layer_norm",), passes=(FORWARD,))
    assert [c.name for c in pairs] == ["soft_split+layer_norm/stage0/forward", "soft_split+layer_norm/stage1/forward"]
    plain = op_cases(settings, ops=("soft_split",), passes=(FORWARD,))[0]
    assert pairs[0].byte_floor() == plain.byte_floor()
    for case in pairs:
        outputs = provider_outputs(case)
        tokens = outputs["eager"]
        torch.testing.assert_close(tokens.mean(-1), torch.zeros_like(tokens.mean(-1)), atol=0.2, rtol=0)
        for name, out in outputs.items():
            torch.testing.assert_close(out, tokens, rtol=1e-5, atol=1e-5, msg=name)


def test_soft_split_layer_norm_linear_cases_are_forward_only_and_providers_agree():
    """Split, LayerNorm and the kqv product: forward cases only (the model's inference path); every provider computes
    the official formula's product, and the byte floor is the image read and the product written."""
    settings = Settings(**TINY, compile=False)
    cases = op_cases(settings, ops=("soft_split+layer_norm+linear",), passes=(FORWARD, FORWARD_BACKWARD))
    assert [c.name for c in cases] == ["soft_split+layer_norm+linear/stage0/forward",
                                       "soft_split+layer_norm+linear/stage1/forward"]
    stage0 = cases[0]
    assert stage0.byte_floor() == (3 * 32 * 32 + 8 * 8 * 192) * 4
    for case in cases:
        outputs = provider_outputs(case)
        if case.backends.unavailable_reason("cpp", settings.device, settings.dtype) is None:
            assert "cpp" in outputs
        assert outputs["eager"].shape == (1, case.out_hw[0] * case.out_hw[1], 192)
        for name, out in outputs.items():
            torch.testing.assert_close(out, outputs["eager"], rtol=1e-5, atol=1e-5, msg=name)


def test_post_attention_cases_are_forward_only_and_providers_agree():
    """The model runs post_attention for inference only: its cases are forward ones, whatever passes are asked for,
    and every provider computes the same output from the same inputs."""
    settings = Settings(**TINY, compile=False)
    cases = op_cases(settings, ops=("post_attention",), passes=(FORWARD, FORWARD_BACKWARD))
    assert [c.name for c in cases] == ["post_attention/stage1/forward", "post_attention/stage2/forward",
                                         "post_attention/backbone/forward"]
    for case in cases:
        outputs = provider_outputs(case)
        assert outputs["eager"].shape == (1, case.T, case.E)
        assert case.E == (384 if case.stage == "backbone" else 64)
        if case.backends.unavailable_reason("cpp", settings.device, settings.dtype) is None:
            assert "cpp" in outputs
        for name, out in outputs.items():
            torch.testing.assert_close(out, outputs["eager"], rtol=1e-5, atol=1e-5, msg=name)


def test_softmax_attention_cases_and_providers_agree():
    """A backbone block's softmax_attention, forward and forward+backward; in the forward every provider computes the
    official formula's output; the backward rows run, with the byte floor of both passes and the cpp op keeping
    only qkv (the eager SDPA path keeps its output and log-sum-exp too)."""
    settings = Settings(**TINY, compile=False)
    case, train = op_cases(settings, ops=("softmax_attention",), passes=(FORWARD, FORWARD_BACKWARD))
    assert (case.name, train.name) == ("softmax_attention/backbone/forward", "softmax_attention/backbone/forward+backward")
    width = 1 * case.T * 384 * 4  # bytes of one (B, T, 384) fp32 tensor
    assert (case.byte_floor(), train.byte_floor()) == (4 * width, 11 * width)
    rows = {r["provider"]: r for r in runner.run_case(train, **FAST)}
    assert rows["eager"]["status"] == "ok"
    if "cpp" in rows:
        assert rows["cpp"]["status"] == "ok" and rows["cpp"]["activation_bytes"] <= rows["eager"]["activation_bytes"]
    outputs = {p.name: case.build(p.name)() for p in case.providers() if p.reason is None and p.name != "compile"}
    qkv = torch.randn(1, case.T, 3 * 384, generator=torch.Generator().manual_seed(0))  # the case's input
    q, k, v = qkv.view(1, case.T, 3, 6, 64).permute(2, 0, 3, 1, 4)
    official = (((q @ k.transpose(-2, -1)) / 8).softmax(-1) @ v).transpose(1, 2).reshape(1, case.T, 384)
    if case.backends.unavailable_reason("cpp", settings.device, settings.dtype) is None:
        assert "cpp" in outputs
    for name, out in outputs.items():
        torch.testing.assert_close(out, official, rtol=1e-5, atol=1e-5, msg=name)


def test_unknown_op_case_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op 'softsplit'"):
        op_cases(Settings(**TINY), ops=("softsplit",))


def test_cli_cases_picks_cases_by_name(tmp_path, capsys):
    """--cases keeps the cases whose name contains one of the given parts (GPU runs pick cases to fit a time limit)."""
    out = tmp_path / "out"
    argv = ["bench", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1", "--no-compile", "--no-memory",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-progress", "--out", str(out),
            "--ops", "performer_attention", "--bandwidth-mb", "16", "--no-checkpointing",
            "--cases", "t2t_vit_7/forward,stage1/forward+backward"]
    assert main(argv) == 0
    cases = {r["case"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert cases == {"t2t_vit_7/forward", "performer_attention/stage1/forward+backward"}
    code, err = exit_status(argv[:-1] + ["nothing"], capsys)
    assert code == 2 and "argument --cases: 'nothing' matches none of the cases [" in err


def test_cli_providers_runs_only_the_named_providers(tmp_path, capsys):
    """--providers runs only the named providers (an A/B of a T2T_* switch times compile-fused alone); the others
    are reported as skipped, and a name no selected case offers is an error that lists what they offer."""
    out = tmp_path / "out"
    argv = ["bench", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1", "--no-ops", "--no-memory",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-progress", "--out", str(out),
            "--bandwidth-mb", "16", "--cases", "t2t_vit_7/forward", "--providers", "fused"]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    status = {r["provider"]: (r["status"], r["reason"]) for r in result["rows"]}
    assert status["fused"] == ("ok", None)
    assert status["eager"] == status["compile-fused"] == ("skipped", "not selected (--providers)")
    assert result["meta"]["settings"]["providers"] == ["fused"]
    code, err = exit_status(argv[:-1] + ["fused,compiled-fused"], capsys)
    assert code == 2
    assert "--providers: 'fused,compiled-fused': ['compiled-fused'] not offered by the selected cases" in err


def test_profile_step_script_prints_each_providers_table(capsys):
    """scripts/profile_step.py (where a case's time goes, per provider) runs on a tiny CPU case."""
    import runpy
    import sys

    module = runpy.run_path("scripts/profile_step.py", run_name="profile_step")
    argv = sys.argv
    try:
        assert module["main"](["--case", "t2t_vit_7/train step", "--batch", "1", "--img-size", "32,48", "--steps",
                               "1", "--rows", "3", "--device", "cpu"]) == 0
    finally:
        sys.argv = argv
    printed = capsys.readouterr().out
    assert "=== t2t_vit_7/train step / eager: wall" in printed and "=== t2t_vit_7/train step / fused: wall" in printed
    assert "Self CPU time total" in printed
    assert "'img_size': [32, 48]" in printed  # --img-size H,W, as the bench takes it


def test_a_run_cut_short_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """results.json is written after each case (meta.partial says how far it got), so a bench stopped by a time limit
    (a lent GPU's) keeps its rows; the finished run's JSON has no "partial"."""
    out = tmp_path / "out"
    argv = ["bench", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1", "--no-compile", "--no-memory",
            "--min-reps", "1", "--max-reps", "1", "--min-time", "0", "--no-progress", "--out", str(out),
            "--no-ops", "--no-checkpointing", "--cases", "t2t_vit_7/"]
    real_run_case = runner.run_case
    calls = []

    def run_case_then_stop(case, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the time limit, during the second case
        calls.append(case.name)
        return real_run_case(case, **kwargs)

    monkeypatch.setattr(runner, "run_case", run_case_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    partial = json.loads((out / "results.json").read_text())
    assert partial["meta"]["partial"] == "1/2 cases"
    assert {r["case"] for r in partial["rows"]} == {"t2t_vit_7/forward"}
    assert "- partial run: stopped after 1/2 cases" in report.markdown(partial)
    monkeypatch.setattr(runner, "run_case", real_run_case)
    assert main(argv) == 0
    assert "partial" not in json.loads((out / "results.json").read_text())["meta"]


def test_an_interrupt_while_writing_keeps_the_previous_results(tmp_path, monkeypatch):
    """results.json is replaced whole (written aside, then renamed): a time limit that strikes mid-write leaves the
    previous cases' file readable (found by review: the in-place rewrite truncated it)."""
    report.write_json({"rows": [1]}, str(tmp_path))

    def dump_then_interrupt(obj, f, **kwargs):
        f.write('{"rows": [1, 2')
        raise KeyboardInterrupt

    monkeypatch.setattr(report.json, "dump", dump_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        report.write_json({"rows": [1, 2]}, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [1]}


def test_compile_mode_reaches_torch_compile_and_the_report(monkeypatch):
    """--compile-mode (e.g. reduce-overhead: CUDA graphs for a host-bound GPU step) is passed to torch.compile and
    said in the provider notes and the report."""
    from t2t_kernels.bench import cases as bench_cases
    from t2t_kernels.bench.cli import build_parser, settings_from_args

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    args = build_parser().parse_args(["--device", "cpu", "--compile-mode", "reduce-overhead"])
    settings = settings_from_args(args)
    bench_cases.compiled(lambda x: x, settings)
    assert seen["mode"] == "reduce-overhead" and seen["backend"] == "inductor"
    case = ModelCase(settings, "t2t_vit_7", "model", TRAIN_STEP)
    notes = {p.name: p.note for p in case.providers()}
    assert notes["compile-fused"] == "torch.compile(inductor, mode='reduce-overhead')"
    result = {"meta": {"device_name": "cpu", "torch": "x", "t2t_kernels": "x", "extension_loaded": True,
                       "python": "3", "date": "today", "command": "bench", "settings": settings.describe()},
              "copy_bandwidth": {"bytes_per_s": 1e9, "method": "clone", "tensor_bytes": 1 << 20}, "rows": []}
    assert "(mode reduce-overhead)" in report.markdown(result)


@pytest.mark.parametrize("choice", [None, "foreach"])
def test_optimizer_choice_reaches_adamw_and_the_report(monkeypatch, choice):
    """--optimizer picks the train steps' AdamW (default fused, as examples/train.py; foreach as the runs before it
    took), the step runs with it, and the report says which (foreach for a JSON without the setting)."""
    from t2t_kernels.bench.cli import build_parser, settings_from_args

    made = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: made.append(kw) or adamw(*a, **kw))
    settings = settings_from_args(build_parser().parse_args(
        ["--device", "cpu", "--img-size", "32", "--batch", "1", "--model", "t2t_vit_7"]
        + (["--optimizer", choice] if choice else [])))
    expected = choice or "fused"
    assert settings.optimizer == expected
    workload = ModelCase(settings, "t2t_vit_7", "t2t_module", TRAIN_STEP).build("fused")
    assert torch.isfinite(workload())
    assert made[-1] == {"lr": 1e-4, expected: True}
    described = settings.describe()
    assert described["optimizer"] == expected
    result = {"meta": {"device_name": "cpu", "torch": "x", "t2t_kernels": "x", "extension_loaded": True,
                       "python": "3", "date": "today", "command": "bench", "settings": described},
              "copy_bandwidth": {"bytes_per_s": 1e9, "method": "clone", "tensor_bytes": 1 << 20}, "rows": []}
    assert f"train steps' AdamW {expected}" in report.markdown(result)
    del described["optimizer"]
    assert "train steps' AdamW foreach" in report.markdown(result)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--optimizer", "sgd"])


def test_cuda_graph_providers_report_no_memory(monkeypatch):
    """Under CUDA graphs (reduce-overhead, max-autotune) a replay allocates from the pool its recording made: the
    compile providers' memory is marked not measured instead of reading near zero (an H100 run read 83 MB peak for
    T2T-ViT-14's train step); eager providers and torch's default mode are measured."""
    from t2t_kernels.bench.cases import unmeasured_memory_reason

    cuda = Settings(**{**TINY, "device": torch.device("cuda"), "compile_mode": "reduce-overhead"})
    assert "CUDA graphs" in unmeasured_memory_reason(cuda, "compile-fused")
    assert unmeasured_memory_reason(cuda, "fused") is None
    assert unmeasured_memory_reason(Settings(**{**TINY, "device": torch.device("cuda")}), "compile-fused") is None
    assert unmeasured_memory_reason(Settings(**{**TINY, "compile_mode": "reduce-overhead"}), "compile-fused") is None
    # the runner consults it per provider (the case runs on the CPU here, with the reason forced)
    monkeypatch.setattr(runner, "unmeasured_memory_reason",
                        lambda settings, provider: "not measured: test" if provider == "eager" else None)
    rows = {r["provider"]: r for r in runner.run_case(_BrokenCase(), **FAST)}
    assert rows["eager"]["memory_error"] == "not measured: test" and "peak_bytes" not in rows["eager"]


def test_the_package_switches_are_recorded_and_reported(monkeypatch):
    """A run under T2T_* switches (e.g. T2T_PERFORMER_SPLIT_BF16=0 for an A/B) says so in its JSON and report, so
    its rows are not read as the defaults' (the first A/B run on an H100 did not)."""
    monkeypatch.setenv("T2T_PERFORMER_SPLIT_BF16", "0")
    meta = runner.machine_info(torch.device("cpu"))
    assert meta["switches"]["T2T_PERFORMER_SPLIT_BF16"] == "0"
    result = {"meta": {**meta, "command": "bench", "settings": Settings(**TINY).describe()},
              "copy_bandwidth": {"bytes_per_s": 1e9, "method": "clone", "tensor_bytes": 1 << 20}, "rows": []}
    assert "T2T_PERFORMER_SPLIT_BF16=0" in report.markdown(result)
    assert "T2T_PERFORMER_SPLIT_BF16=0" in report.text_table(result)
    monkeypatch.delenv("T2T_PERFORMER_SPLIT_BF16")
    for name in [n for n in os.environ if n.startswith("T2T_")]:
        monkeypatch.delenv(name)
    assert "switches" not in runner.machine_info(torch.device("cpu"))


def test_pytest_benchmark_suites_run(tmp_path):
    """`pytest benchmarks/ --benchmark-only` (the pytest-benchmark suites over the same cases): every case collects
    (10 providers per model case, an op case per backend), and the eager and fused providers run once each at a tiny
    size (--benchmark-disable), in a child pytest with the suites' environment settings."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "T2T_BENCH_DEVICE": "cpu", "T2T_BENCH_BATCH": "1", "T2T_BENCH_IMG": "32",
           "T2T_BENCH_MODELS": "t2t_vit_7"}
    args = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "--rootdir", root, "--basetemp", str(tmp_path / "pytest")]
    collected = subprocess.run(args + ["--collect-only"], cwd=root, env=env, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert sum("bench_model.py::test_model[t2t_vit_7/" in i for i in ids) == 10
    assert sum("bench_model.py::test_t2t_module[t2t_vit_7.tokens_to_token/" in i for i in ids) == 10
    assert any("bench_ops.py::test_forward_backward[performer_attention/" in i for i in ids)
    ran = subprocess.run(args + ["-k", "forward-eager or forward-fused or forward-cpp"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    passed = re.search(r"(\d+) passed", ran.stdout)
    assert passed and int(passed.group(1)) >= 20 and " failed" not in ran.stdout, ran.stdout[-3000:]


# ---- found by the audit of 2026-11-28 ----------------------------------------------------------------------------
def test_cpu_peak_of_a_train_step_excludes_the_gradients_it_reallocates():
    """A train step frees the previous step's gradients (zero_grad(set_to_none=True)) and backward allocates them
    again: its peak above its start is about its activations, as CUDA's max_memory_allocated - before says. The CPU
    replay read 32 MB here, exactly the gradients: torch.profiler drops the frees of blocks allocated before it
    started. A forward's numbers are what they were."""
    from t2t_kernels.bench.cases import _forward, _train_step

    torch.manual_seed(0)
    settings = Settings(**TINY)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    x = torch.randn(4, 2048)
    step = _train_step(model, x, lambda out: out.square().mean(), settings)
    step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    activations = runner.measure_memory(step.probe, CPU, exclude_result=True)[1]
    assert activations == 2 * 4 * 2048 * 4  # the first Linear's output and the second's, which square keeps
    for _ in range(2):  # the same each time
        peak, held = runner.measure_memory(step, CPU)
        assert 0 < peak <= 2 * activations and grads > 200 * peak
        assert held < 4096  # the gradients replaced one for one; the loss

    # no grad: the first Linear's output, then the second's while the first is alive; the first is freed
    peak, held = runner.measure_memory(_forward(model, x, settings), CPU)
    assert (peak, held) == (2 * 4 * 2048 * 4, 4 * 2048 * 4)


def test_abbreviated_options_are_refused(capsys):
    """An abbreviation (--rec for --record) went into the recorded command and the --record key: a re-run added a
    section instead of replacing its own."""
    for argv, message in ((["bench", "--rec", "B.md"], "unrecognized arguments: --rec B.md"),
                          (["bench", "--ou", "r7"], "unrecognized arguments: --ou r7"),
                          (["info", "--mod", "t2t_vit_7", "--steps", "0"], "unrecognized arguments: --mod t2t_vit_7")):
        code, err = exit_status(argv, capsys)
        assert code == 2 and message in err, argv
    with pytest.raises(SystemExit):
        report.main(["results.json", "--rec", "B.md"])
    assert "unrecognized arguments: --rec B.md" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--max-reps", "0"], "argument --max-reps: must be positive, got 0"),
    (["--min-reps", "5", "--max-reps", "2"], "argument --max-reps: 2 is below --min-reps 5"),
    (["--bandwidth-mb", "-1"], "argument --bandwidth-mb: must be positive, got -1"),
    (["--bandwidth-mb", "0"], "argument --bandwidth-mb: must be positive, got 0"),
    (["--device", "xpu"], "argument --device: 'xpu': choose cpu or cuda"),
    (["--batch", "0"], "argument --batch: must be positive, got 0"),
    (["--threads", "0"], "argument --threads: must be positive, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be non-negative, got -1"),
    (["--model", ","], "argument --model: no model named in ','"),
    (["--no-compile", "--providers", "compile-fused"],
     "argument --providers: 'compile-fused': compile-fused is skipped in every selected case (torch.compile "
     "providers are off (--no-compile))"),
])
def test_bench_argument_errors_name_the_argument(extra, message, capsys):
    code, err = exit_status(TINY_RUN[:-4] + extra, capsys)
    assert code == 2 and message in err, err


def test_an_unknown_provider_is_an_error_not_the_fused_model(capsys):
    """ModelCase.build read any name as fused (profile_step.py --providers bogus,eagr profiled it twice)."""
    import runpy

    case = ModelCase(Settings(**TINY), "t2t_vit_7", "model", FORWARD)
    with pytest.raises(ValueError, match="unknown provider 'eagr'"):
        case.build("eagr")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    profile_step = runpy.run_path(os.path.join(root, "scripts", "profile_step.py"), run_name="profile_step")["main"]
    with pytest.raises(SystemExit):
        profile_step(["--case", "t2t_vit_7/forward", "--providers", "bogus,eager", "--batch", "1", "--img-size", "32",
                      "--device", "cpu"])
    err = capsys.readouterr().err
    assert "argument --providers: bogus (not offered)" in err and "eager (" not in err
    tune = runpy.run_path(os.path.join(root, "scripts", "tune_performer.py"), run_name="tune_performer")
    args = tune["parse_args"](["--img-size", "32,48", "--device", "cpu"])
    assert (args.img_size, args.device) == ((32, 48), CPU)
    with pytest.raises(SystemExit):
        tune["parse_args"](["--device", "xpu"])


def test_benchmark_suite_environment_is_parsed_as_the_cli_options(monkeypatch):
    """T2T_BENCH_DTYPE=bf16 (the CLI's spelling) crashed the suites' collection, T2T_BENCH_IMG=224,320 too, and the
    ops with GPU kernels ran in fp32 (on a GPU bf16 and fp32) whatever T2T_BENCH_DTYPE said."""
    import importlib.util

    from t2t_kernels.bench.cases import env_settings

    for name in [n for n in os.environ if n.startswith("T2T_BENCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("T2T_BENCH_DEVICE", "cpu")
    monkeypatch.setenv("T2T_BENCH_DTYPE", "bf16")
    monkeypatch.setenv("T2T_BENCH_IMG", "32,48")
    monkeypatch.setenv("T2T_BENCH_MODELS", "t2t_vit_7")
    settings = env_settings()
    assert (settings.dtype, settings.img_size, settings.models) == (torch.bfloat16, (32, 48), ("t2t_vit_7",))
    assert env_settings(batch=3).batch == 3

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(root, "benchmarks", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    ops = ("soft_split", "soft_split+layer_norm", "performer_attention", "dropout_add")
    cases = conftest.op_cases_per_dtype(ops, FORWARD_BACKWARD)
    assert {case.op for case in cases} == set(ops)
    assert {case.settings.dtype for case in cases} == {torch.bfloat16}

    monkeypatch.setenv("T2T_BENCH_DTYPE", "bf17")
    with pytest.raises(ValueError, match="T2T_BENCH_DTYPE='bf17': choose from"):
        env_settings()


def test_without_matplotlib_the_run_keeps_its_json_markdown_and_record(tmp_path, monkeypatch, capsys):
    """matplotlib is optional: without it the bench skips the plot with a note (and removes an older run's plot)
    instead of failing after the timing."""
    import sys

    out, record = tmp_path / "out", tmp_path / "B.md"
    out.mkdir()
    (out / "speedups.png").write_bytes(b"an older run's")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(TINY_RUN + ["--out", str(out), "--record", str(record)]) == 0
    captured = capsys.readouterr()
    assert "no plot: matplotlib is not importable" in captured.err
    assert "results.md" in captured.out and "speedups.png" not in captured.out
    assert not (out / "speedups.png").exists()
    assert json.loads((out / "results.json").read_text())["rows"][0]["status"] == "ok"
    assert "| t2t_vit_7 forward" in (out / "results.md").read_text()
    assert "| t2t_vit_7 forward" in record.read_text()

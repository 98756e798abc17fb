import os
import subprocess
import sys

import pytest
import torch

import t2t_kernels
from t2t_kernels.__main__ import main


def test_info_prints_parameters_macs_and_backends(capsys):
    assert main(["--model", "t2t_vit_7", "--img-size", "64", "--steps", "1", "--batch", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in t2t_kernels.t2t_vit_7(img_size=64).parameters())
    assert f"parameters                    {params / 1e6:.2f} M" in out
    macs_line = next(line for line in out.splitlines() if line.startswith("GMACs"))
    assert float(macs_line.split()[1]) > 0
    assert "soft_split backends" in out and "eager" in out
    assert "images/s" in out


def test_info_macs_scale_with_image_size(capsys):
    def macs(img):
        main(["info", "--model", "t2t_vit_7", "--img-size", img, "--steps", "0"])
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("GMACs"))
        return float(line.split()[1])

    assert macs("64,128") > 1.8 * macs("64")


def test_info_macs_include_the_attention_products():
    """T2T-ViT-14 at 224x224: the official code's 4.8 GMACs, the blocks' attention products (2 N^2 E MACs each) among
    them, however the model runs its attention; the model's attention setting is left as it was."""
    from t2t_kernels.__main__ import count_macs

    model = t2t_kernels.t2t_vit_14(backend="eager").eval()
    x = torch.randn(1, 3, 224, 224)
    macs = count_macs(model, x)
    assert round(macs / 1e9, 1) == 4.8
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    attention = 14 * 2 * 197**2 * 384
    model.blocks = model.blocks[:0]  # what the blocks add beyond their Linears is their attention products
    linears = sum(197 * m.in_features * m.out_features for m in t2t_kernels.t2t_vit_14().blocks.modules()
                  if isinstance(m, torch.nn.Linear))
    assert macs - count_macs(model, x) == linears + attention


def test_info_bad_arguments(capsys):
    assert main(["--model", "t2t_vit_7", "--img-size", "100", "--steps", "0"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["info"], ["bench", "--no-progress"]])
def test_bad_devices_are_argument_errors(command, capsys):
    """An unknown device string, or CUDA where torch sees no GPU: an argument error naming --device, before any work
    (info had printed its table, then torch's driver error)."""
    devices = ["tpu:x", "xpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        try:
            code = main([*command, "--device", device])
        except SystemExit as exit_:  # argparse's own exit (bench's parser)
            code = exit_.code
        err = capsys.readouterr()
        assert code == 2 and "argument --device" in err.err and err.out == "", (device, err)


def test_info_takes_its_options_before_the_word_info(capsys):
    """`--model t2t_vit_7 --img-size 32 --steps 0 info`: the subcommand's defaults overwrote the values given before
    the word (T2T-ViT-14 at 224 was described); options after the word win."""
    assert main(["--model", "t2t_vit_7", "--img-size", "32", "--steps", "0", "info"]) == 0
    assert "t2t_vit_7  img_size (32, 32)" in capsys.readouterr().out
    assert main(["--model", "t2t_vit_14", "--img-size", "32", "--steps", "0", "info", "--model", "t2t_vit_7"]) == 0
    assert "t2t_vit_7  img_size (32, 32)" in capsys.readouterr().out


def test_options_before_bench_are_an_error_not_info(capsys):
    """`--steps 0 bench` ran info (only argv[0] == "bench" went to the bench); the bench's options go after it."""
    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "0", "bench", "--no-progress"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert "--steps 0: options go after the word bench" in captured.err


def test_package_works_without_the_extension(tmp_path):
    """With the extension off, the package warns once, runs on eager, and gives the same logits."""
    import t2t_kernels

    model = t2t_kernels.t2t_vit_7(img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"state": model.state_dict(), "x": x}, tmp_path / "in.pt")
    script = (
        "import sys, warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import t2t_kernels\n"
        "assert not t2t_kernels.ops.EXTENSION_LOADED\n"
        "assert t2t_kernels.ops.SOFT_SPLIT_BACKENDS.available('cpu') in (['eager'], ['eager', 'triton'])\n"
        f"data = torch.load(r'{tmp_path / 'in.pt'}')\n"
        "model = t2t_kernels.t2t_vit_7(img_size=32).eval()\n"
        "model.load_state_dict(data['state'])\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(data['x']), r'{tmp_path / 'out.pt'}')\n"
    )
    env = {**os.environ, "T2T_KERNELS_DISABLE_EXT": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(x), rtol=1e-5, atol=1e-6)

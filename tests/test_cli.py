"""The `minisd` command as a user runs it: demo, generate, trace, errors, help."""

import numpy as np
import pytest
from PIL import Image

from minisd.cli import main


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_demo_writes_a_png_with_parameters(demo_cache, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--cache", str(demo_cache), "--out", str(out), "--steps", "3"]) == 0
    img = Image.open(out)
    assert img.size == (128, 128)
    params = img.text["parameters"]
    assert params.startswith("a watercolor painting of a lighthouse\nSteps: 3, Sampler: pndm")
    text = capsys.readouterr().out
    assert "RANDOM-WEIGHT DEMO" in text and "minisd generate" in text
    assert (demo_cache / "demo-sd1" / "model_index.json").is_file()  # cached for the next run


def test_generate_img2img_and_trace(demo_cache, tmp_path):
    model = demo_cache / "demo-sd1"
    init = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)).save(init)
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(model), "--init-image", str(init)]
    args += ["--strength", "0.5", "--steps", "4", "--scheduler", "ddim", "--n", "2"]
    args += ["--out", str(out), "--weights", "stream"]
    assert main(args) == 0
    for k in (0, 1):
        assert Image.open(tmp_path / f"out-{k}.png").size == (96, 64)
    npy = tmp_path / "t.npy"
    args = ["trace", "--model", str(model), "--module", "mid_block.attentions.0", "--out", str(npy)]
    assert main(args) == 0
    assert np.load(npy).ndim == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "60x64"], "width=60"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--scheduler", "nope"], "scheduler='nope'"),
        (["--init-image", "missing.png"], "missing.png"),
    ],
)
def test_generate_errors_are_clear(demo_cache, args, message, capsys):
    argv = ["generate", "a cat", "--model", str(demo_cache / "demo-sd1"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_pickles(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "none")]) == 2
    assert "no such" in capsys.readouterr().err
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"x")
    assert main(["generate", "x", "--model", str(ckpt)]) == 2
    assert "never loaded" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["demo"], ["generate"], ["trace"], ["parity"]])
def test_help_explains_every_flag(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for line in text.splitlines():
        if line.strip().startswith("--") and "  " in line.strip():
            assert len(line.strip().split("  ", 1)[1].strip()) > 3, line  # every flag has help


def test_generate_weights_modes_give_the_same_image(demo_cache, tmp_path):
    """--weights stream (memory-mapped float16 files cast per layer) changes memory, not pixels."""
    model = demo_cache / "demo-sd1"
    pixels = {}
    for mode in ("eager", "stream"):
        out = tmp_path / f"{mode}.png"
        args = ["generate", "a cat", "--model", str(model), "--steps", "2", "--size", "64x64"]
        assert main([*args, "--weights", mode, "--out", str(out)]) == 0
        pixels[mode] = np.asarray(Image.open(out))
    assert pixels["eager"].shape == (64, 64, 3)
    np.testing.assert_array_equal(pixels["eager"], pixels["stream"])

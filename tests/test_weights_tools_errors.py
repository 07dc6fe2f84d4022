"""weights_tools on bad arguments and bad output paths: clear errors, and nothing lost or left.

Numpy only. Outputs are checked before any work; files and folders are written aside and moved
into place only when complete, so a failure leaves the named output as it was.
"""

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import weights_tools as wt
from minisd.errors import ConfigError, InputError, WeightsError
from minisd.weights import load_file, read_header, save_file
from weights_tools.__main__ import main
from weights_tools.stream import write_tensors

TEXT = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def tiny(tiny_sd1_files):
    return tiny_sd1_files  # (folder, single file), see conftest.py


def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` (what a failed command must keep)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _no_leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if "partial" in p.name]


# ------------------------------------------------------------------------- output paths


def test_an_existing_folder_as_output_file_is_refused_up_front(tiny, tmp_path):
    folder, single = tiny
    target = tmp_path / "existing"
    target.mkdir()
    for run in (
        lambda: wt.to_original(folder, target),
        lambda: wt.cast(single, target, "fp16"),
    ):
        with pytest.raises(WeightsError, match=f"{target}: is a folder"):
            run()
    assert list(target.iterdir()) == [] and _no_leftovers(tmp_path) == []
    assert main(["to-original", str(folder), str(target)]) == 2
    assert main(["cast", str(single), str(target), "--dtype", "fp16"]) == 2


def test_output_file_needs_an_existing_parent_folder(tiny, tmp_path):
    folder, _ = tiny
    (tmp_path / "file").write_text("keep")
    for out, why in (
        (tmp_path / "missing" / "x.safetensors", "does not exist"),
        (tmp_path / "file" / "x.safetensors", "is not a folder"),
    ):
        with pytest.raises(WeightsError, match=f"{out}: cannot write out_file there.*{why}"):
            wt.to_original(folder, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "keep"


def test_an_existing_file_as_output_folder_is_refused(tiny, tmp_path):
    folder, single = tiny
    target = tmp_path / "file"
    target.write_text("keep")
    for run in (
        lambda: wt.to_diffusers(single, target),
        lambda: wt.make_tiny(target),
        lambda: wt.cast(folder, target, "fp16"),
        lambda: wt.make_tiny(target / "sub"),
    ):
        with pytest.raises(WeightsError, match=str(target)):
            run()
    assert target.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert main(["make-tiny", str(target)]) == 2
    assert main(["to-diffusers", str(single), str(target)]) == 2


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_output_file_is_a_weights_error(tiny):
    _, single = tiny
    with pytest.raises(WeightsError, match="/proc/c.safetensors: cannot write it"):
        wt.cast(single, "/proc/c.safetensors", "fp16")


def test_a_failed_rename_removes_the_temporary_file(tiny, tmp_path, monkeypatch):
    import weights_tools.stream as stream

    _, single = tiny
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"previous")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(stream.os, "replace", refuse)
    with pytest.raises(WeightsError, match=f"{out}: cannot write it"):
        wt.cast(single, out, "fp16")
    assert out.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [out]


# ------------------------------------------------------------------------- folders: all or nothing


def test_folder_cast_validates_every_file_before_writing(tiny, tmp_path):
    folder, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    text = bad / TEXT  # the last component written: the others would be done before it
    text.write_bytes(text.read_bytes()[:2000])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", existing):
        with pytest.raises(WeightsError, match=str(text)):
            wt.cast(bad, out, "fp16")
    assert not (tmp_path / "new").exists()
    assert _tree(existing) == {"notes.txt": b"mine"} and _no_leftovers(tmp_path) == []
    assert main(["cast", str(bad), str(tmp_path / "cli"), "--dtype", "fp16"]) == 2
    assert not (tmp_path / "cli").exists()


def test_a_failure_midway_leaves_the_output_folder_as_it_was(tiny, tmp_path, monkeypatch):
    convert = importlib.import_module("weights_tools.convert")
    make_tiny = importlib.import_module("weights_tools.make_tiny")  # (the package's name: the fn)

    folder, single = tiny
    shutil.copytree(folder, tmp_path / "out")
    before = _tree(tmp_path / "out")

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(convert, "write_configs", boom)  # after every weights file is written
    monkeypatch.setattr(make_tiny, "write_configs", boom)
    with pytest.raises(RuntimeError):
        wt.to_diffusers(single, tmp_path / "out", dtype="fp16")
    assert _tree(tmp_path / "out") == before
    with pytest.raises(RuntimeError):
        wt.make_tiny(tmp_path / "a" / "b" / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no partial, no new parents"


def test_writing_into_an_existing_folder_replaces_its_files_and_keeps_others(tiny, tmp_path):
    folder, single = tiny
    out = tmp_path / "out"
    wt.make_tiny(out, seed=5)
    (out / "notes.txt").write_text("mine")
    wt.to_diffusers(single, out)
    assert (out / "notes.txt").read_text() == "mine" and _no_leftovers(tmp_path) == []
    assert wt.verify(folder, out)["same"]
    wt.cast(out, out, "fp16")  # in place
    assert {t[0] for t in read_header(out / TEXT)[0].values()} == {"F16"}
    assert (out / "notes.txt").read_text() == "mine"


def test_a_file_in_the_way_inside_the_output_folder_stops_before_moving_anything(tiny, tmp_path):
    _, single = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae").write_text("a file where vae/ goes")
    (out / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError, match="in the way"):
        wt.to_diffusers(single, out)
    assert _tree(out) == {"vae": b"a file where vae/ goes", "model_index.json": b"{}"}
    assert _no_leftovers(tmp_path) == []


def test_casting_a_folder_into_itself_does_not_copy_the_output_into_itself(tiny, tmp_path):
    folder, _ = tiny
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    for _ in range(2):
        wt.cast(src, src / "half", "fp16")
    assert not (src / "half" / "half").exists() and _no_leftovers(src) == []
    assert {t[0] for t in read_header(src / "half" / TEXT)[0].values()} == {"F16"}


# ------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad", [None, 5, "", b"x.safetensors"])
def test_path_arguments_that_are_not_paths(tiny, tmp_path, bad):
    folder, single = tiny
    for run, name in (
        (lambda: wt.inspect(bad), "path"),
        (lambda: wt.verify(bad, single), "a"),
        (lambda: wt.verify(single, bad), "b"),
        (lambda: wt.cast(bad, tmp_path / "c", "fp16"), "path"),
        (lambda: wt.cast(single, bad, "fp16"), "out"),
        (lambda: wt.to_diffusers(bad, tmp_path / "d"), "single_file"),
        (lambda: wt.to_diffusers(single, bad), "out_folder"),
        (lambda: wt.to_original(bad, tmp_path / "o.safetensors"), "folder"),
        (lambda: wt.to_original(folder, bad), "out_file"),
        (lambda: wt.make_tiny(bad), "out_folder"),
        (lambda: wt.load_single_file(bad), "path"),
    ):
        with pytest.raises(InputError, match=f"^{name}={bad!r}: expected a file or folder path"):
            run()
    if bad is not None:  # (config=None is the default)
        with pytest.raises(InputError, match=f"^config={bad!r}"):
            wt.to_diffusers(single, tmp_path / "d", config=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, "a", True, 1.5, None])
def test_make_tiny_seed_must_be_a_non_negative_integer(tmp_path, seed):
    with pytest.raises(InputError, match=f"seed={seed!r}"):
        wt.make_tiny(tmp_path / "t", seed=seed)
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_seed_accepts_numpy_integers_and_cli_reports_bad_ones(tmp_path):
    wt.make_tiny(tmp_path / "a", seed=np.int64(3))
    wt.make_tiny(tmp_path / "b", seed=3)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert main(["make-tiny", str(tmp_path / "c"), "--seed", "-1"]) == 2
    assert not (tmp_path / "c").exists()


def test_prediction_type_is_checked_before_anything_is_written(tiny, tmp_path):
    folder, single = tiny
    with pytest.raises(InputError, match="prediction_type='foo': expected one of epsilon"):
        wt.to_diffusers(single, tmp_path / "out", prediction_type="foo")
    with pytest.raises(InputError, match="prediction_type='foo'"):
        wt.load_single_file(single, prediction_type="foo")
    assert list(tmp_path.iterdir()) == []
    wt.to_diffusers(single, tmp_path / "ok", prediction_type="sample")
    sched = json.loads((tmp_path / "ok/scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == "sample"


def test_a_config_folder_with_a_bad_prediction_type_is_named(tiny, tmp_path):
    folder, single = tiny
    config = tmp_path / "config"
    shutil.copytree(folder, config)
    path = config / "scheduler/scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "foo"}))
    with pytest.raises(ConfigError, match=f"{config}: scheduler.*prediction_type='foo'"):
        wt.to_diffusers(single, tmp_path / "out", config=config)
    assert not (tmp_path / "out").exists()


def test_an_lcm_unet_has_no_original_layout(tiny, tmp_path):
    """LCM-distilled UNets (time_cond_proj_dim) carry a cond_proj Linear that the original
    (ldm) layout has no name for: refused by name, before anything is written."""
    folder, _ = tiny
    lcm = tmp_path / "lcm"
    shutil.copytree(folder, lcm)
    path = lcm / "unet/config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "time_cond_proj_dim": 8}))
    with pytest.raises(WeightsError, match=f"{lcm}: an LCM-distilled UNet"):
        wt.to_original(lcm, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------- file metadata


@pytest.mark.parametrize(
    "hints, why",
    [
        ('{"unet": 5}', "'unet' of type int, not a JSON object"),
        ("[1, 2]", "is not a JSON object"),
        ("{garbage", "is not valid JSON"),
        ('{"scheduler": {"prediction_type": "foo"}}', "prediction_type='foo'"),
        ('{"scheduler": {"prediction_type": "epsilon"}}', "without _class_name"),
        ('{"tokenizer": {"pad": 1}}', "without pad_token"),
    ],
)
def test_unusable_config_metadata_is_ignored_with_a_warning(tiny, tmp_path, hints, why):
    _, single = tiny
    flat = dict(load_file(single))
    plain, bad = tmp_path / "plain.safetensors", tmp_path / "bad.safetensors"
    save_file(flat, plain)
    save_file(flat, bad, metadata={"minisd_configs": hints})
    want = wt.load_single_file(plain)
    with pytest.warns(UserWarning, match=f"{bad}: metadata minisd_configs.*{why}.*ignored"):
        got = wt.load_single_file(bad)
    for part in ("unet", "vae", "text_encoder"):
        assert got[part][0] == want[part][0], part
    assert got["scheduler"] == want["scheduler"] and got["family"] == "sd1"
    with pytest.warns(UserWarning, match="minisd_configs"):
        wt.to_diffusers(bad, tmp_path / "out")
    assert wt.verify(single, tmp_path / "out")["same"]


def test_plain_metadata_is_not_taken_for_configs(tmp_path):
    """An SD2 file with ordinary metadata ({"format": "pt"}) gets the same inferred configs as
    one without: 768-v assumed, with its sample sizes."""
    wt.make_tiny(tmp_path / "sd2", family="sd2")
    wt.to_original(tmp_path / "sd2", tmp_path / "sd2.safetensors")
    flat = dict(load_file(tmp_path / "sd2.safetensors"))
    path = tmp_path / "pt.safetensors"
    write_tensors(path, [(k, "F32", v.shape, v) for k, v in flat.items()], {"format": "pt"})
    with pytest.warns(UserWarning, match="v_prediction"):
        got = wt.load_single_file(path)
    assert got["unet"][0]["sample_size"] == 96 and got["vae"][0]["sample_size"] == 768
    report = wt.inspect(path)
    assert report["prediction_type_assumed"] and report["config_source"] == "tensor shapes"


def test_the_current_folder_can_be_the_output(tiny, tmp_path, monkeypatch):
    _, single = tiny
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    wt.make_tiny(".", seed=1)
    wt.to_diffusers(single, ".")
    assert wt.verify(single, tmp_path / "here")["same"] and _no_leftovers(tmp_path) == []

"""minisd.weights: the safetensors reader/writer, its validation errors, nested params."""

import json
import struct

import numpy as np
import pytest
from refharness import need

from minisd import weights
from minisd.errors import MinisdError, WeightsError


def _write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good(tmp_path):
    flat = {"a.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    path = tmp_path / "good.safetensors"
    weights.save_file(flat, path)
    return path, flat


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_reads_files_written_by_safetensors_torch(tmp_path, dtype):
    torch = need("torch")
    from safetensors.torch import save_file

    t = torch.randn(3, 5, dtype=torch.float32).to(getattr(torch, dtype))
    path = tmp_path / "t.safetensors"
    save_file({"x.weight": t, "y": torch.arange(4)}, str(path))
    out = weights.load_file(path)
    expect = t.float().numpy() if dtype == "bfloat16" else t.numpy()
    assert out["x.weight"].dtype == expect.dtype
    np.testing.assert_array_equal(out["x.weight"], expect)  # bf16 widens exactly
    np.testing.assert_array_equal(out["y"], np.arange(4))
    cast = weights.load_file(path, dtype="float64")
    assert cast["x.weight"].dtype == np.float64 and cast["y"].dtype == np.int64


def test_save_file_is_readable_by_safetensors(tmp_path):
    from safetensors.numpy import load_file

    path, flat = _good(tmp_path)
    back = load_file(str(path))
    assert set(back) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    assert not list(tmp_path.glob("*.partial"))


def test_nest_flatten_roundtrip():
    flat = {"down_blocks.0.resnets.1.conv1.weight": 1, "ff.net.2.bias": 2, "ff.net.0.proj.bias": 3}
    nested = weights.nest(flat)
    assert nested["down_blocks"][0]["resnets"][1]["conv1"]["weight"] == 1
    assert set(nested["ff"]["net"]) == {0, 2}  # indices keep their gaps
    assert weights.flatten(nested) == flat


def test_recording_dict_records_full_names():
    rec = weights.RecordingDict(weights.nest({"a.0.w": 1, "a.0.b": 2, "c": 3}))
    assert rec["a"][0]["w"] == 1
    assert rec.get("c") == 3 and rec.get("missing") is None
    assert rec.reads == {"a.0.w", "c"}


def test_check_keys_errors_name_the_key():
    flat = {"x": np.zeros((2, 3)), "y": np.zeros(3)}
    weights.check_keys(flat, {"x": (2, 3), "y": (3,)}, "f.safetensors")
    with pytest.raises(WeightsError, match=r"f\.safetensors.*missing key 'z'"):
        weights.check_keys(flat, {"x": (2, 3), "y": (3,), "z": (1,)}, "f.safetensors")
    with pytest.raises(WeightsError, match="unexpected key 'y'"):
        weights.check_keys(flat, {"x": (2, 3)}, "f.safetensors")
    with pytest.raises(WeightsError, match=r"key 'x' has shape \(2, 3\), expected \(3, 2\)"):
        weights.check_keys(flat, {"x": (3, 2), "y": (3,)}, "f.safetensors")


def test_nest_refuses_a_key_that_is_a_prefix_of_another():
    x = np.zeros(1)
    for flat in ({"a": x, "a.b": x}, {"a.b": x, "a": x}):  # both orders: none silently dropped
        with pytest.raises(WeightsError, match="key 'a"):
            weights.nest(flat)


def test_save_file_failure_leaves_nothing(tmp_path):
    flat = {"w": np.ones(3, np.float32)}
    (tmp_path / "taken").mkdir()  # a folder where the file should go
    for out in (tmp_path / "taken", tmp_path / "missing" / "w.safetensors"):
        with pytest.raises(WeightsError, match="cannot write it") as info:
            weights.save_file(flat, out)
        assert str(out) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no .partial left


def test_check_keys_refuses_integer_weights():
    # an int8 / bool tensor where a float weight belongs would otherwise load and compute garbage
    want = {"x": (2, 3), "ids": (1, 4)}
    for bad in (np.int8, np.uint8, np.bool_):
        flat = {"x": np.zeros((2, 3), bad), "ids": np.zeros((1, 4), np.int64)}
        with pytest.raises(WeightsError, match=r"f.safetensors: key 'x' is stored as"):
            weights.check_keys(flat, want, "f.safetensors")
    flat = {"x": np.zeros((2, 3), np.float16), "position_ids": np.zeros((1, 4), np.int64)}
    weights.check_keys(flat, {"x": (2, 3), "position_ids": (1, 4)}, "f")  # integer buffer: fine


@pytest.mark.parametrize(
    "raw, message",
    [(b"\xff\xfe{}", "not valid JSON"), (b"[1]", "expected a JSON object"), (b"null", "object")],
)
def test_read_config_names_the_file(tmp_path, raw, message):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(MinisdError, match=message) as info:
        weights.read_config(path)
    assert str(path) in str(info.value)


def _bad_files(tmp_path):
    good, _ = _good(tmp_path)
    raw = good.read_bytes()
    yield "empty", b"", "empty or truncated"
    yield "short", raw[:5], "empty or truncated"
    yield "truncated", raw[:-3], "outside the file"
    yield "garbage header", struct.pack("<Q", 8) + b"\xff\xfe{{{{{{", "not valid JSON"
    yield "header beyond file", struct.pack("<Q", 10**6) + b"{}", "beyond the file"
    yield "absurd header", struct.pack("<Q", 2**62) + b"{}", "beyond the file"
    e = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    yield "offsets outside", {"w": {**e, "data_offsets": [0, 160]}}, "outside the file"
    yield "overlap", {"w": e, "v": {**e, "data_offsets": [8, 24]}}, "overlap"
    yield "unknown dtype", {"w": {**e, "dtype": "F8_E4M3X"}}, "unsupported dtype"
    yield "size mismatch", {"w": {**e, "shape": [3]}}, "needs 12 bytes"
    yield "not an object", [1, 2], "not a JSON object"
    yield "negative offset", {"w": {**e, "data_offsets": [-4, 12]}}, "outside the file"
    yield "shape not a list", {"w": {**e, "shape": 4}}, "bad shape"
    yield "bool in shape", {"w": {**e, "shape": [True]}}, "bad shape"
    yield "dtype not a string", {"w": {**e, "dtype": ["F32"]}}, "unsupported dtype"
    yield "bool offset", {"w": {**e, "data_offsets": [False, 16]}}, "two integers"
    # 2**64 elements: an int64 product wraps to 0 and would match empty data_offsets
    huge = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}
    yield "overflowing shape", {"w": huge}, "needs 73786976294838206464 bytes"


@pytest.mark.parametrize("case", range(17))
def test_bad_files_raise_naming_the_file(tmp_path, case):
    name, content, message = list(_bad_files(tmp_path))[case]
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write_raw(path, content, b"\0" * 32)
    with pytest.raises(WeightsError, match=message) as info:
        weights.load_file(path)
    assert str(path) in str(info.value), name
    assert isinstance(info.value, MinisdError)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_are_refused_without_reading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not even read")
    with pytest.raises(WeightsError, match="never loaded.*safetensors") as info:
        weights.load_file(path)
    assert str(path) in str(info.value)


def test_missing_file_and_missing_key(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        weights.load_file(tmp_path / "nope.safetensors")
    good, _ = _good(tmp_path)
    with pytest.raises(WeightsError, match="missing key 'zzz'"):
        weights.load_file(good, keys=["zzz"])


def test_find_weights(tmp_path):
    with pytest.raises(WeightsError, match="no such model folder"):
        weights.find_weights(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="never loaded"):
        weights.find_weights(tmp_path)
    good, _ = _good(tmp_path)
    good.rename(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert weights.find_weights(tmp_path).name == "diffusion_pytorch_model.fp16.safetensors"


def test_loaded_arrays_are_memory_mapped_views(tmp_path):
    good, flat = _good(tmp_path)
    out = weights.load_file(good)
    assert not out["a.0.weight"].flags.writeable  # a read-only view of the file, not a copy
    np.testing.assert_array_equal(out["a.0.weight"], flat["a.0.weight"])

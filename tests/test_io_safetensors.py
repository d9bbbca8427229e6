"""The pure-NumPy safetensors reader, checked against the reference library."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tuckerlib.io import CheckpointError, TensorInfo, open_checkpoint, read_delta

torch = pytest.importorskip("torch", reason="bf16/fp16 references are made with torch")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs torch")

NUMPY_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint64,
    np.uint32,
    np.uint16,
    np.uint8,
    np.bool_,
]


def _raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


@pytest.fixture
def mixed_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    tensors = {
        f"t.{np.dtype(dtype).name}": (rng.standard_normal((3, 5)) * 50).astype(dtype)
        for dtype in NUMPY_DTYPES
    }
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    tensors["conv.weight"] = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"format": "np"})
    return path, tensors


def test_every_numpy_dtype_matches_the_reference_reader(mixed_file) -> None:
    path, tensors = mixed_file
    reference = load_file(path)
    with open_checkpoint(path) as ckpt:
        assert set(ckpt) == set(tensors)
        assert len(ckpt) == len(tensors)
        for name, expected in reference.items():
            assert ckpt.info(name) == TensorInfo(expected.shape, ckpt.info(name).dtype)
            for got in (ckpt[name], ckpt.read(name)):
                assert got.dtype == expected.dtype
                np.testing.assert_array_equal(got, expected)
        assert ckpt.metadata == {"format": "np"}


def test_indexing_is_a_read_only_memory_map_and_read_owns_its_memory(mixed_file) -> None:
    path, tensors = mixed_file
    with open_checkpoint(path) as ckpt:
        view = ckpt["conv.weight"]
        owned = ckpt.read("conv.weight")
    assert not view.flags.writeable
    assert owned.flags.writeable
    assert owned.flags.owndata or (owned.base is not None and owned.base.flags.owndata)
    # Arrays handed out before close stay valid afterwards.
    np.testing.assert_array_equal(view, tensors["conv.weight"])


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 10**6])
def test_chunks_concatenate_to_the_tensor_in_the_requested_dtype(mixed_file, chunk_bytes) -> None:
    path, tensors = mixed_file
    with open_checkpoint(path) as ckpt:
        pieces = list(ckpt.chunks("conv.weight", np.float64, chunk_bytes))
    assert all(p.dtype == np.float64 and p.ndim == 1 for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), tensors["conv.weight"].ravel())
    assert len(pieces) == -(-tensors["conv.weight"].size // max(1, chunk_bytes // 4))


def test_read_converts_dtype(mixed_file) -> None:
    path, tensors = mixed_file
    with open_checkpoint(path) as ckpt:
        got = ckpt.read("t.float16", np.float64)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, tensors["t.float16"].astype(np.float64))


def _half_precision_file(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(17, 9, generator=gen).to(torch.bfloat16) * 1e3,
        "bf16_special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38]).to(
            torch.bfloat16
        ),
        "fp16": torch.randn(6, 5, 3, generator=gen).to(torch.float16),
    }
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file(tensors, path)
    return path, tensors


def test_bf16_and_fp16_equal_torch_conversion(tmp_path: Path) -> None:
    path, tensors = _half_precision_file(tmp_path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.info("bf16") == TensorInfo((17, 9), "BF16")
        assert ckpt.info("fp16").dtype == "F16"
        for name, tensor in tensors.items():
            expected = tensor.float().numpy()
            got = ckpt[name].astype(np.float32)
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(
                np.signbit(got), np.signbit(expected), err_msg=f"sign bits of {name}"
            )
        assert ckpt["bf16"].dtype == np.float32
        assert ckpt["fp16"].dtype == np.float16


def test_half_precision_reading_never_imports_torch(tmp_path: Path) -> None:
    path, tensors = _half_precision_file(tmp_path)
    expected = tmp_path / "expected.npz"
    np.savez(expected, **{name: t.float().numpy() for name, t in tensors.items()})
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now fails
        import numpy as np
        from tuckerlib.io import open_checkpoint
        expected = np.load({str(expected)!r})
        with open_checkpoint({str(path)!r}) as ckpt:
            for name in expected.files:
                assert np.array_equal(ckpt.read(name, np.float32), expected[name]), name
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_tensor_is_a_key_error_naming_it(mixed_file) -> None:
    path, _ = mixed_file
    with open_checkpoint(path) as ckpt:
        assert "nope" not in ckpt
        with pytest.raises(KeyError, match="nope"):
            ckpt.info("nope")
        with pytest.raises(KeyError, match="nope"):
            ckpt["nope"]


def test_unsupported_dtype_is_listed_but_unreadable(tmp_path: Path) -> None:
    header = {"f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    path = _raw_file(tmp_path / "f8.safetensors", header, b"\x00\x01")
    with open_checkpoint(path) as ckpt:
        assert ckpt.info("f8") == TensorInfo((2,), "F8_E4M3")
        assert not ckpt.info("f8").is_floating
        with pytest.raises(CheckpointError, match="unsupported dtype F8_E4M3"):
            ckpt.read("f8")


def test_reading_after_close_fails_clearly(mixed_file) -> None:
    path, _ = mixed_file
    ckpt = open_checkpoint(path)
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("conv.weight")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "only 0 bytes"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "exceeds the file"),
        ((5).to_bytes(8, "little") + b"{nope", "bad JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_malformed_files_raise_checkpoint_error(tmp_path: Path, content, message) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [2]}, "malformed"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "malformed"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}, "past the end"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ],
)
def test_inconsistent_header_entries_are_rejected(tmp_path: Path, entry, message) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", {"w": entry}, bytes(8))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_missing_path_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_read_delta_streams_the_difference_in_the_right_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = {"a": rng.standard_normal((5, 7)), "b": rng.standard_normal((4, 4)).astype(np.float32)}
    tuned = {"a": base["a"] + 1.0, "b": base["b"] * 2, "c": np.zeros((4, 5), np.float32)}
    base["c"] = np.zeros((5, 4), np.float32)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    with (
        open_checkpoint(tmp_path / "base.safetensors") as b,
        open_checkpoint(tmp_path / "tuned.safetensors") as t,
    ):
        wide = read_delta(b, t, "a")
        assert wide.dtype == np.float64
        np.testing.assert_array_equal(wide, tuned["a"] - base["a"])
        narrow = read_delta(b, t, "b")
        assert narrow.dtype == np.float32
        np.testing.assert_array_equal(narrow, base["b"])
        with pytest.raises(ValueError, match="shape"):
            read_delta(b, t, "c")

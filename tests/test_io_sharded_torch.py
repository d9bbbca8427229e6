"""Sharded checkpoints, PyTorch state dicts, and the refusal of unsafe pickles."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tuckerlib.io import CheckpointError, TensorInfo, open_checkpoint

torch = pytest.importorskip("torch", reason="PyTorch checkpoints need torch")


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "embed.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "layer.0.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(4).astype(np.float32),
        "head.weight": rng.standard_normal((3, 4)).astype(np.float64),
    }


def _write_sharded(directory: Path, tensors: dict[str, np.ndarray], suffix: str) -> Path:
    directory.mkdir()
    names = list(tensors)
    shards = {
        "model-00001-of-00002" + suffix: names[:2],
        "model-00002-of-00002" + suffix: names[2:],
    }
    for filename, members in shards.items():
        part = {name: tensors[name] for name in members}
        if suffix == ".safetensors":
            save_file(part, directory / filename)
        else:
            torch.save({k: torch.from_numpy(v) for k, v in part.items()}, directory / filename)
    weight_map = {name: filename for filename, members in shards.items() for name in members}
    index = directory / f"model{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_sharded_checkpoint_by_directory_or_index(tmp_path: Path, suffix: str) -> None:
    tensors = _tensors()
    index = _write_sharded(tmp_path / "model", tensors, suffix)
    for path in (index, index.parent):
        with open_checkpoint(path) as ckpt:
            assert set(ckpt) == set(tensors)
            assert ckpt.info("head.weight") == TensorInfo((3, 4), "F64")
            for name, expected in tensors.items():
                np.testing.assert_array_equal(ckpt[name], expected)
                np.testing.assert_array_equal(ckpt.read(name, np.float64), expected)
                pieces = list(ckpt.chunks(name, np.float64, chunk_bytes=8))
                np.testing.assert_array_equal(np.concatenate(pieces), expected.ravel())


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    index = _write_sharded(tmp_path / "model", _tensors(), ".safetensors")
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shard 'model-00002-of-00002\.safetensors' is missing"
    ):
        open_checkpoint(index.parent)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(tmp_path: Path) -> None:
    index = _write_sharded(tmp_path / "model", _tensors(), ".safetensors")
    content = json.loads(index.read_text())
    content["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"'ghost\.weight' is not in shard"):
        open_checkpoint(index)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "bad JSON"), ('{"weight_map": [1]}', 'no "weight_map"'), ("[]", "weight_map")],
)
def test_malformed_index(tmp_path: Path, content: str, message: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(index)


def test_directory_resolution(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        open_checkpoint(tmp_path)
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt) == ["w"]
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"several safetensors files \(a.safetensors"):
        open_checkpoint(tmp_path)


def test_torch_state_dict_every_float_dtype(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(5, 3, generator=gen),
        "b": torch.randn(4, 2, 3, generator=gen).to(torch.bfloat16),
        "c": torch.randn(7, generator=gen).to(torch.float16),
        "d": torch.randn(2, 2, generator=gen).double(),
        "steps": torch.tensor(3),
        "t": torch.randn(6, 4, generator=gen).t(),  # a non-contiguous view
    }
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with open_checkpoint(path) as ckpt:
        assert set(ckpt) == set(state)
        assert ckpt.info("b") == TensorInfo((4, 2, 3), "BF16")
        assert ckpt.info("steps") == TensorInfo((), "I64")
        for name, tensor in state.items():
            np.testing.assert_array_equal(
                ckpt[name], tensor.float().numpy().astype(ckpt[name].dtype)
            )
            np.testing.assert_array_equal(ckpt.read(name, np.float64), tensor.double().numpy())
            pieces = list(ckpt.chunks(name, np.float32, chunk_bytes=4))
            np.testing.assert_array_equal(
                np.concatenate(pieces) if pieces else np.zeros(0), tensor.float().numpy().ravel()
            )


def test_torch_checkpoint_wrapping_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "trainer.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2, 2)}, "lr": 0.1}, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt) == ["w"]


def test_torch_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="no tensors found"):
        open_checkpoint(path)


def test_garbage_bin_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        open_checkpoint(path)


class _Exploit:
    """Pickles as a call to os.system: what a malicious checkpoint contains."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Exploit(f"touch {marker}")}, path)

    with pytest.raises(CheckpointError, match="refused to load") as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()

    # The file really is malicious: an unsafe load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_torch_gives_an_actionable_message(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"needs PyTorch \(pip install torch\)"):
        open_checkpoint(path)


def test_shard_outside_the_directory_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuckerlib.io._sharded as sharded

    outside = tmp_path / "outside.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    opened = []
    monkeypatch.setattr(sharded, "open_file", lambda path: opened.append(path))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        open_checkpoint(model)
    assert opened == []


def test_hugging_face_cache_layout_with_linked_shards_loads(tmp_path: Path) -> None:
    # snapshots/<revision>/ holds links into ../../blobs/, as huggingface_hub writes them.
    repo = tmp_path / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    tensors = {"a.weight": np.ones((2, 3), np.float32), "b.weight": np.zeros(4, np.float32)}
    weight_map = {}
    for i, (name, tensor) in enumerate(tensors.items()):
        blob = blobs / f"blob{i}"
        save_file({name: tensor}, str(blob))
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        (snapshot / shard).symlink_to(Path("..", "..", "blobs", blob.name))
        weight_map[name] = shard
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_checkpoint(snapshot) as checkpoint:
        assert sorted(checkpoint) == sorted(tensors)
        np.testing.assert_array_equal(checkpoint["a.weight"], np.ones((2, 3), np.float32))

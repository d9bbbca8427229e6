"""Bad checkpoints and bad arguments to tuckerlib.io: one CheckpointError naming the file.

``FILES`` builds one bad file (or directory) per row in a fresh directory;
opening and reading it must raise a :class:`CheckpointError` (a
``ValueError``) whose message names the path and the problem, never a
``SafetensorError``, an ``OSError`` or an error from deep inside a library.
``CALLS`` are bad arguments to the readers' functions. A new reader or
function joins by adding rows.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tuckerlib.io import CheckpointError, open_checkpoint, pair_checkpoints, read_delta

torch = pytest.importorskip("torch")

W = np.arange(12, dtype=np.float32).reshape(3, 4)


def _good(path: Path) -> Path:
    save_file({"w": W}, path)
    return path


def _bytes(name: str, content: Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content())
        return path

    return build


def _header(entry: object, data: bytes = b"\0" * 48) -> bytes:
    raw = json.dumps(entry).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(**fields: object) -> bytes:
    entry = {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48], **fields}
    return _header({"w": entry})


def _truncated() -> bytes:
    buffer = _header({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}})
    return buffer[:-5]


def _duplicate_header() -> bytes:
    entry = json.dumps({"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]})
    raw = f'{{"w": {entry}, "w": {entry}}}'.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 48


def _torch_file(name: str, tensors: Callable[[], dict]) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / name
        torch.save(tensors(), path)
        return path

    return build


def _directory(name: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        path = directory / name
        path.mkdir()
        return path

    return build


def _sharded(index: object, shards: dict[str, bytes] | None = None) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        root = directory / "model"
        root.mkdir()
        for name, content in (shards or {}).items():
            (root / name).write_bytes(content)
        path = root / "model.safetensors.index.json"
        if isinstance(index, bytes):
            path.write_bytes(index)
        else:
            path.write_text(json.dumps(index))
        return root

    return build


def _outside_shard(name: str | None) -> Callable[[Path], Path]:
    """An index naming a valid safetensors file outside its directory (absolute if None)."""

    def build(directory: Path) -> Path:
        outside = directory / "outside.safetensors"
        outside.write_bytes(_entry())
        filename = str(outside) if name is None else name
        return _sharded({"weight_map": {"w": filename}})(directory)

    return build


def _deep_header() -> bytes:
    raw = b"[" * 100_000
    return struct.pack("<Q", len(raw)) + raw


def _index_directory(directory: Path) -> Path:
    root = directory / "model"
    (root / "model.safetensors.index.json").mkdir(parents=True)
    return root


def _two_files(directory: Path) -> Path:
    _good(directory / "a.safetensors")
    _good(directory / "b.safetensors")
    return directory


class _Exploit:
    """Pickles as a call to os.system."""

    def __reduce__(self):
        return (os.system, ("true",))


WEIGHT_MAP = {"weight_map": {"w": "shard.safetensors"}}

FILES = [
    # safetensors files that are not what they claim
    pytest.param(
        _bytes("trunc.safetensors", _truncated),
        r"trunc\.safetensors: tensor 'w' extends past the end of the file",
        id="truncated",
    ),
    pytest.param(
        _bytes("empty.safetensors", bytes),
        r"empty\.safetensors: not a safetensors file \(only 0 bytes\)",
        id="empty",
    ),
    pytest.param(
        _bytes("random.safetensors", lambda: np.random.default_rng(0).bytes(256)),
        r"random\.safetensors: not a safetensors file",
        id="random-bytes",
    ),
    pytest.param(
        _bytes("pickle.safetensors", lambda: pickle.dumps({"w": W})),
        r"pickle\.safetensors: not a safetensors file",
        id="pickle-renamed",
    ),
    pytest.param(
        _torch_file("zip.safetensors", lambda: {"w": torch.ones(2)}),
        r"zip\.safetensors: not a safetensors file",
        id="torch-zip-renamed",
    ),
    pytest.param(
        _directory("folder.safetensors"),
        r"folder\.safetensors: no checkpoint here",
        id="directory-at-the-path",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=["3", 4.9])),
        r"hdr\.safetensors: .*'w': shape must be a list of non-negative integers, got \['3', 4.9\]",
        id="shape-string-and-float",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=[3.0, 4])),
        r"hdr\.safetensors: .*shape must be .*got \[3\.0, 4\]",
        id="shape-integral-float",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=[True, 12])),
        r"hdr\.safetensors: .*shape must be .*got \[True, 12\]",
        id="shape-bool",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=[-3, -4])),
        r"hdr\.safetensors: .*shape must be .*got \[-3, -4\]",
        id="shape-negative",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=12)),
        r"hdr\.safetensors: .*shape must be a list",
        id="shape-not-a-list",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(data_offsets=[0, 48.0])),
        r"hdr\.safetensors: .*data_offsets must be two integers",
        id="offsets-float",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(data_offsets=[48, 0])),
        r"hdr\.safetensors: .*data_offsets must be two integers 0 <= begin <= end",
        id="offsets-reversed",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(data_offsets=[0])),
        r"hdr\.safetensors: .*data_offsets",
        id="offsets-one-number",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(dtype=5)),
        r"hdr\.safetensors: malformed header entry for tensor 'w'",
        id="dtype-not-a-string",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _header({"w": 5})),
        r"hdr\.safetensors: malformed header entry",
        id="entry-not-an-object",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _header([1, 2])),
        r"hdr\.safetensors: not a safetensors file \(header is not a JSON object\)",
        id="header-not-an-object",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: struct.pack("<Q", 4) + b"{{{{"),
        r"hdr\.safetensors: not a safetensors file \(bad JSON header",
        id="header-bad-json",
    ),
    pytest.param(
        _bytes("hdr.safetensors", lambda: _entry(shape=[4, 4])),
        r"hdr\.safetensors: tensor 'w' has 48 bytes but shape \[4, 4\]",
        id="size-mismatch",
    ),
    pytest.param(
        _bytes("dup.safetensors", lambda: _duplicate_header()),
        r"dup\.safetensors: not a safetensors file \(bad JSON header: key 'w' appears twice\)",
        id="header-names-a-tensor-twice",
    ),
    pytest.param(
        _bytes(
            "f8.safetensors",
            lambda: _header(
                {"w": {"dtype": "F8_E4M3", "shape": [3, 4], "data_offsets": [0, 12]}}, b"\0" * 12
            ),
        ),
        r"f8\.safetensors: tensor 'w' has unsupported dtype F8_E4M3",
        id="unsupported-dtype-read",
    ),
    pytest.param(
        _bytes(
            "overlap.safetensors",
            lambda: _header(
                {
                    "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                    "b": {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]},
                }
            ),
        ),
        r"overlap\.safetensors: tensor 'b' \(bytes 16-48\) overlaps the tensor before it",
        id="offsets-overlap",
    ),
    pytest.param(
        _bytes(
            "gap.safetensors",
            lambda: _header(
                {
                    "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                    "b": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]},
                }
            ),
        ),
        r"gap\.safetensors: tensor 'b' \(bytes 24-48\) leaves a gap",
        id="offsets-leave-a-gap",
    ),
    pytest.param(
        _bytes("tail.safetensors", lambda: _entry(shape=[3], data_offsets=[0, 12])),
        r"tail\.safetensors: the tensors cover 12 of the 48 data bytes",
        id="offsets-leave-bytes-over",
    ),
    # PyTorch files
    pytest.param(
        _torch_file("meta.pt", lambda: {"w": torch.ones(3, 4, device="meta")}),
        r"meta\.pt: tensor 'w' is a meta tensor: it has a shape but holds no values",
        id="torch-meta-tensor",
    ),
    pytest.param(
        _torch_file("sparse.pt", lambda: {"w": torch.ones(3, 4).to_sparse()}),
        r"sparse\.pt: tensor 'w' is a sparse tensor \(torch\.sparse_coo\)",
        id="torch-sparse-tensor",
    ),
    pytest.param(
        _torch_file("csr.pt", lambda: {"w": torch.ones(3, 4).to_sparse_csr()}),
        r"csr\.pt: tensor 'w' is a sparse tensor \(torch\.sparse_csr\)",
        id="torch-sparse-csr-tensor",
    ),
    pytest.param(
        _torch_file("complex.pt", lambda: {"w": torch.ones(3, 4, dtype=torch.complex64)}),
        r"complex\.pt: tensor 'w' has unsupported dtype complex64",
        id="torch-complex-read",
    ),
    pytest.param(
        _torch_file("evil.pt", lambda: {"w": torch.ones(2), "payload": _Exploit()}),
        r"evil\.pt: refused to load: the pickle holds more than tensors \(.*unsupported GLOBAL",
        id="torch-malicious-pickle",
    ),
    pytest.param(
        _bytes("empty.pt", bytes), r"empty\.pt: not a readable PyTorch checkpoint", id="torch-empty"
    ),
    pytest.param(
        _bytes("text.bin", lambda: b"PK\x03\x04 not a zip at all"),
        r"text\.bin: not a readable PyTorch checkpoint",
        id="torch-broken-zip",
    ),
    pytest.param(
        _torch_file("keys.pt", lambda: {1: torch.ones(2), "1": torch.ones(3)}),
        r"keys\.pt: keys 1 and '1' of the state dict both read as tensor name '1'",
        id="torch-keys-that-collide",
    ),
    pytest.param(
        _torch_file("none.pt", lambda: {"step": 3}),
        r"none\.pt: no tensors found",
        id="torch-no-tensors",
    ),
    pytest.param(
        _directory("folder.pt"), r"folder\.pt: no checkpoint here", id="torch-directory-at-the-path"
    ),
    # sharded checkpoints and directories
    pytest.param(
        _index_directory,
        r"model\.safetensors\.index\.json: cannot read \(Is a directory\)",
        id="index-is-a-directory",
    ),
    pytest.param(
        _sharded(b""),
        r"model\.safetensors\.index\.json: not a checkpoint index \(bad JSON",
        id="index-empty",
    ),
    pytest.param(
        _sharded(b"\xff\xfe"),
        r"index\.json: not a checkpoint index \(bad JSON: 'utf-8' codec",
        id="index-binary",
    ),
    pytest.param(
        _sharded({"weights": {}}),
        r"index\.json: not a checkpoint index \(no \"weight_map\"",
        id="index-without-weight-map",
    ),
    pytest.param(
        _sharded(b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}'),
        r"index\.json: not a checkpoint index \(bad JSON: key 'w' appears twice\)",
        id="index-names-a-tensor-twice",
    ),
    pytest.param(
        _sharded(WEIGHT_MAP),
        r"index\.json: shard 'shard\.safetensors' is missing",
        id="index-missing-shard",
    ),
    pytest.param(
        _outside_shard("../outside.safetensors"),
        r"index\.json: shard '\.\./outside\.safetensors' is not a file name inside .*model",
        id="index-names-a-shard-above-its-directory",
    ),
    pytest.param(
        _outside_shard("sub/../../outside.safetensors"),
        r"index\.json: shard 'sub/\.\./\.\./outside\.safetensors' is not a file name inside",
        id="index-climbs-out-through-a-subdirectory",
    ),
    pytest.param(
        _outside_shard(None),
        r"index\.json: shard '/.*outside\.safetensors' is not a file name inside",
        id="index-names-an-absolute-path",
    ),
    pytest.param(
        _sharded({"weight_map": {"w": "../../../../etc/passwd"}}),
        r"index\.json: shard '\.\./\.\./\.\./\.\./etc/passwd' is not a file name inside",
        id="index-names-a-system-file",
    ),
    pytest.param(
        _sharded({"weight_map": {"w": "C:\\shards\\w.safetensors"}}),
        r"index\.json: shard 'C:.*' is not a file name inside",
        id="index-names-a-drive-path",
    ),
    pytest.param(
        _sharded(b"[" * 100_000),
        r"index\.json: not a checkpoint index \(bad JSON: maximum recursion depth",
        id="index-nested-too-deeply",
    ),
    pytest.param(
        _bytes("deep.safetensors", _deep_header),
        r"deep\.safetensors: not a safetensors file \(bad JSON header: maximum recursion",
        id="header-nested-too-deeply",
    ),
    pytest.param(
        _sharded(WEIGHT_MAP, {"shard.safetensors": b"xx"}),
        r"shard\.safetensors: not a safetensors file \(only 2 bytes\)",
        id="index-corrupt-shard",
    ),
    pytest.param(
        _two_files,
        r"several safetensors files \(a\.safetensors, b\.safetensors\)",
        id="directory-two-files",
    ),
    pytest.param(
        lambda d: d / "absent.safetensors",
        r"absent\.safetensors: no such file or directory",
        id="missing-path",
    ),
]


def _read_everything(path: Path) -> None:
    with open_checkpoint(path) as ckpt:
        for name in ckpt:
            ckpt.read(name)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(("build", "match"), FILES)
def test_bad_checkpoint_is_one_checkpoint_error_naming_the_file(
    tmp_path: Path, build, match
) -> None:
    path = build(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        _read_everything(path)
    assert isinstance(info.value, ValueError)
    assert len(str(info.value).splitlines()) == 1


@pytest.fixture
def good(tmp_path: Path):
    with open_checkpoint(_good(tmp_path / "good.safetensors")) as ckpt:
        yield ckpt


CALLS = [
    pytest.param(
        lambda c: open_checkpoint(3),
        TypeError,
        r"path must be a str or os\.PathLike, got int",
        id="open-path-int",
    ),
    pytest.param(
        lambda c: open_checkpoint(None),
        TypeError,
        r"path must be a str or os\.PathLike, got NoneType",
        id="open-path-none",
    ),
    pytest.param(lambda c: open_checkpoint(""), ValueError, r"path is empty", id="open-path-empty"),
    pytest.param(
        lambda c: c.read("w", dtype="foo"),
        TypeError,
        r"dtype must be a NumPy dtype, got 'foo'",
        id="read-dtype-unknown",
    ),
    pytest.param(
        lambda c: c.read("absent"),
        KeyError,
        r"no tensor 'absent' in .*good\.safetensors",
        id="read-missing-tensor",
    ),
    pytest.param(
        lambda c: list(c.chunks("w", chunk_bytes=0)),
        ValueError,
        r"chunk_bytes must be >= 1, got 0",
        id="chunks-zero-bytes",
    ),
    pytest.param(
        lambda c: list(c.chunks("w", chunk_bytes="4")),
        TypeError,
        r"chunk_bytes must be an integer >= 1, got str",
        id="chunks-string-bytes",
    ),
    pytest.param(
        lambda c: pair_checkpoints(c, c, include="("),
        ValueError,
        r"include is not a valid regular expression '\(': missing \)",
        id="pair-include-bad-regex",
    ),
    pytest.param(
        lambda c: pair_checkpoints(c, c, exclude="[a"),
        ValueError,
        r"exclude is not a valid regular expression",
        id="pair-exclude-bad-regex",
    ),
    pytest.param(
        lambda c: pair_checkpoints(c, c, include=3),
        TypeError,
        r"include must be a regular expression \(str or re\.Pattern\) .*, got int",
        id="pair-include-int",
    ),
    pytest.param(
        lambda c: pair_checkpoints(c, c, include=re.compile(b"w")),
        TypeError,
        r"include must be a regular expression .* matching str names, got bytes",
        id="pair-include-bytes-pattern",
    ),
    pytest.param(
        lambda c: pair_checkpoints(None, c),
        TypeError,
        r"base must be a Checkpoint \(see open_checkpoint\), got NoneType",
        id="pair-base-none",
    ),
    pytest.param(
        lambda c: pair_checkpoints(c, {"w": W}),
        TypeError,
        r"tuned must be a Checkpoint .*got dict",
        id="pair-tuned-dict",
    ),
    pytest.param(
        lambda c: read_delta(c, c, "w", dtype="complex64"),
        ValueError,
        r"dtype must be a real floating dtype for a difference, got 'complex64'",
        id="delta-complex-dtype",
    ),
    pytest.param(
        lambda c: read_delta(c, c, "w", dtype=np.int8),
        ValueError,
        r"dtype must be a real floating dtype",
        id="delta-integer-dtype",
    ),
    pytest.param(
        lambda c: read_delta(c, c, "w", dtype="foo"),
        TypeError,
        r"dtype must be a NumPy dtype",
        id="delta-unknown-dtype",
    ),
    pytest.param(
        lambda c: read_delta(c, "tuned.safetensors", "w"),
        TypeError,
        r"tuned must be a Checkpoint .*got str",
        id="delta-path-not-checkpoint",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), CALLS)
def test_bad_arguments_get_a_clear_error(good, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(good)


def test_a_device_is_not_a_checkpoint() -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    with pytest.raises(CheckpointError, match=r"^/dev/null: not a regular file$"):
        open_checkpoint("/dev/null")


def test_operating_system_errors_become_checkpoint_errors(tmp_path: Path, monkeypatch) -> None:
    path = _good(tmp_path / "locked.safetensors")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(
        CheckpointError, match=r"locked\.safetensors: cannot read \(Permission denied\)"
    ):
        open_checkpoint(path)


def test_files_lists_every_file_a_checkpoint_reads(tmp_path: Path) -> None:
    root = tmp_path / "model"
    root.mkdir()
    save_file({"a": W}, root / "a.safetensors")
    save_file({"b": W}, root / "b.safetensors")
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "b": "b.safetensors"}}))
    with open_checkpoint(root) as ckpt:
        assert ckpt.files == (index, root / "a.safetensors", root / "b.safetensors")
    with open_checkpoint(root / "a.safetensors") as ckpt:
        assert ckpt.files == (root / "a.safetensors",)


def _peft(tensors: dict[str, tuple[int, ...]], config: object = None) -> Callable[[Path], Path]:
    """A PEFT adapter directory: ``tensors`` (short name: shape) and a LoRA config."""

    def build(directory: Path) -> Path:
        root = directory / "peft"
        root.mkdir()
        save_file(
            {f"base_model.model.{k}": np.ones(s, np.float32) for k, s in tensors.items()},
            root / "adapter_model.safetensors",
        )
        document = {"peft_type": "LORA", "r": 2, "lora_alpha": 2} if config is None else config
        text = document if isinstance(document, str) else json.dumps(document)
        (root / "adapter_config.json").write_text(text)
        return root

    return build


def _flora_deep_config(directory: Path) -> Path:
    root = _peft({"fc.lora_A.weight": (2, 3), "fc.lora_B.weight": (4, 2)})(directory)
    (root / "adapter_config.json").write_text('{"format": "flora", "layers": ' + "[" * 100_000)
    return root


#: PEFT and flora adapter directories whose tensors fit no layer kind, or whose
#: config cannot be parsed: one AdapterError (a ValueError) naming the file and layer.
ADAPTERS = [
    pytest.param(
        _peft({"emb.lora_embedding_A": (2, 10), "emb.lora_embedding_B": (4, 3)}),
        r"peft: layer 'emb': lora_embedding_A \[2, 10\] and lora_embedding_B \[4, 3\]: an "
        r"Embedding pair must be \(r, num\) and \(dim, r\)",
        id="embedding-ranks-differ",
    ),
    pytest.param(
        _peft({"emb.lora_embedding_A": (2, 10, 1), "emb.lora_embedding_B": (4, 2)}),
        r"peft: layer 'emb': lora_embedding_A \[2, 10, 1\] .*an Embedding pair must be",
        id="embedding-a-3d",
    ),
    pytest.param(
        _peft({"emb.lora_embedding_A": (2,), "emb.lora_embedding_B": (4, 2)}),
        r"peft: layer 'emb': lora_embedding_A \[2\] .*an Embedding pair must be",
        id="embedding-a-1d",
    ),
    pytest.param(
        _peft({"conv.lora_A.weight": (2, 3, 3, 3), "conv.lora_B.weight": (4, 0, 1, 1)}),
        r"peft: layer 'conv': lora_A \[2, 3, 3, 3\] and lora_B \[4, 0, 1, 1\]: every dimension "
        r"must be >= 1",
        id="conv-b-zero-rank",
    ),
    pytest.param(
        _peft({"fc.lora_A.weight": (2, 0), "fc.lora_B.weight": (4, 2)}),
        r"peft: layer 'fc': lora_A \[2, 0\] .*every dimension must be >= 1",
        id="linear-a-zero-inputs",
    ),
    pytest.param(
        _peft({"fc.lora_A.weight": (2,), "fc.lora_B.weight": (4, 2)}),
        r"peft: layer 'fc': lora_A \[2\] and lora_B \[4, 2\]: a Linear pair must be 2-D",
        id="linear-a-1d",
    ),
    pytest.param(
        _peft({"conv.lora_A.weight": (2, 3, 3, 3), "conv.lora_B.weight": (4, 2)}),
        r"peft: layer 'conv': lora_A \[2, 3, 3, 3\] and lora_B \[4, 2\]: a Linear pair must be",
        id="conv-b-2d",
    ),
    pytest.param(
        _peft({"big.lora_A.weight": (2, 1, 1, 1, 1, 1), "big.lora_B.weight": (4, 2, 1, 1, 1, 1)}),
        r"peft: layer 'big': lora_A \[2, 1, 1, 1, 1, 1\] .*a Linear pair must be 2-D",
        id="a-6d",
    ),
    pytest.param(
        _peft({"conv.lora_A.weight": (2, 3, 3), "conv.lora_B.weight": (4, 3, 1)}),
        r"peft: layer 'conv': lora_B \[4, 3, 1\] does not fit lora_A \[2, 3, 3\]",
        id="conv-b-wider-than-rank",
    ),
    pytest.param(
        _peft({"fc.lora_A.weight": (2, 3), "fc.lora_B.weight": (4, 2)}, "[" * 100_000),
        r"peft.adapter_config\.json: not valid JSON \(nested too deeply\)",
        id="peft-config-nested-too-deeply",
    ),
    pytest.param(
        _flora_deep_config,
        r"peft.adapter_config\.json: not valid JSON",
        id="flora-config-nested-too-deeply",
    ),
    pytest.param(
        _peft(
            {"fc.lora_A.weight": (2, 3), "fc.lora_B.weight": (4, 2)},
            {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "alpha_pattern": {"(?=fc)fc": 1}},
        ),
        r"alpha_pattern: pattern '\(\?=fc\)fc' is not a regular expression RE2 can match",
        id="alpha-pattern-lookahead",
    ),
]


@pytest.mark.parametrize(("build", "match"), ADAPTERS)
def test_bad_adapter_is_one_adapter_error_naming_the_file(tmp_path: Path, build, match) -> None:
    from tuckerlib.io import AdapterError, open_adapter

    def read_everything(directory: Path) -> None:
        with open_adapter(directory) as adapter:
            for name in adapter:
                adapter[name].to_tensor()

    with pytest.raises(AdapterError, match=match) as info:
        read_everything(build(tmp_path))
    assert isinstance(info.value, ValueError)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("table", ["rank_pattern", "alpha_pattern"])
def test_a_catastrophic_pattern_from_a_file_returns_within_a_second(tmp_path, table) -> None:
    import time

    from tuckerlib.io import open_adapter

    name = "a" * 34 + "!"
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, table: {"(a+)+": 2}}
    directory = _peft({f"{name}.lora_A.weight": (2, 3), f"{name}.lora_B.weight": (4, 2)}, config)
    start = time.perf_counter()
    with open_adapter(directory(tmp_path)) as adapter:
        assert adapter[name].scale == 1.0
    assert time.perf_counter() - start < 1.0

"""Memory-mapped safetensors reading (single files and sharded `*.index.json` sets) and writing.

Reading parses the header itself and hands out numpy views of a memory map, so a tensor costs host
memory only when it is touched, and bf16 is read without a framework. Every malformed input raises
`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used as given."""


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses one safetensors file's header: `({key: TensorInfo}, metadata)`; checks it against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} does not fit "
                                      f"a {size}-byte file)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {key!r} ({e!r})") from e
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: header entry for {key!r} has {end - begin} bytes for shape {shape} "
                                  f"{entry['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated (tensor {key!r} ends at byte {data_start + end}, "
                                  f"file has {size})")
        tensors[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata


class TensorSource:
    """Read-only mapping `key -> np.ndarray` over one or more safetensors files, memory-mapped.

    `strip_prefix` removes a key prefix (e.g. `model.diffusion_model.` of single-file checkpoints);
    `rename` then maps each stored name to the name the caller asks for (e.g. legacy module names).
    """

    def __init__(self, files: list[Path], strip_prefix: str = "", rename: Callable[[str], str] | None = None):
        self.files = [Path(f) for f in files]
        self._infos: dict[str, TensorInfo] = {}
        self._rename = rename or (lambda key: key)
        self._strip_prefix = strip_prefix
        for path in self.files:
            tensors, _ = read_header(path)
            for stored, info in tensors.items():
                key = self.name(stored)
                if key in self._infos:
                    raise CheckpointError(f"{path}: tensor {key!r} also appears in {self._infos[key].path}")
                self._infos[key] = info

    def name(self, stored: str) -> str:
        """The key under which the tensor stored as `stored` is read."""
        if self._strip_prefix and stored.startswith(self._strip_prefix):
            stored = stored[len(self._strip_prefix):]
        return self._rename(stored)

    @classmethod
    def from_index(cls, index_path: Path, **naming) -> "TensorSource":
        """Opens a sharded checkpoint through its `*.safetensors.index.json` weight map."""
        index_path = Path(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a readable safetensors index ({e!r})") from e
        files = sorted({index_path.parent / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard files missing: {', '.join(missing)}")
        source = cls(files, **naming)
        misplaced = sorted(k for k, name in weight_map.items()
                           if source.name(k) not in source._infos or source._infos[source.name(k)].path.name != name)
        if misplaced:
            raise CheckpointError(f"{index_path}: {len(misplaced)} keys are not in the shard the index names, "
                                  f"first {misplaced[0]!r}")
        return source

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._infos[key].shape

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._infos[key]
        if info.end == info.start:  # mmap refuses an empty range
            return np.empty(info.shape, info.dtype)
        # A map of this tensor alone, closed with its last view: the file pages a loader touches count towards
        # its RSS while it reads the tensor, not until the whole checkpoint is read.
        raw = np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
        return raw.view(info.dtype).reshape(info.shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy, ml_dtypes bf16 allowed) as one safetensors file, keys sorted."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = {}
    for key in sorted(tensors):
        # np.ascontiguousarray would turn a 0-d tensor into shape [1].
        array = np.asarray(tensors[key], order="C")
        if array.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot write tensor {key!r} of dtype {array.dtype} to safetensors")
        header[key] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays[key] = array
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.tobytes())


def write_sharded(folder: Path, stem: str, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """Writes `stem.safetensors`, or numbered shards plus `stem.safetensors.index.json` when larger
    than `max_shard_bytes`. Returns the file names written."""
    folder = Path(folder)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", shards[0])
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(folder / name, shard)
        weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + os.linesep)
    return names + [f"{stem}.safetensors.index.json"]

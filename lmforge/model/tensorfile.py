"""Read and write safetensors one tensor at a time, so converting a checkpoint never holds two copies.

The `safetensors` library reads through a memory map (every page read stays resident while the file
is open) and writes only from a complete dict in memory. Conversion needs neither: the format is an
8-byte little-endian header length, a JSON header of {name: dtype, shape, data_offsets}, then the raw
bytes (https://github.com/huggingface/safetensors#format). So we seek and read each tensor into its
own buffer, and write the header first (all shapes are known up front), then each tensor's bytes.
Files written here load with `safetensors.load_file` and transformers.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError
from lmforge.io import atomic_path

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorFile:
    """One .safetensors file: its header now, each tensor's bytes when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {entry.get('dtype')!r}; "
                                      f"supported: {sorted(DTYPES)}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` (a contiguous tensor of its shape and dtype) when given."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        if out is None:
            out = torch.empty(self.shape(name), dtype=self.dtype(name))
        elif tuple(out.shape) != self.shape(name) or out.dtype != self.dtype(name) or not out.is_contiguous():
            raise ValueError(f"{name}: cannot read {self.shape(name)} {self.dtype(name)} into {tuple(out.shape)} "
                             f"{out.dtype}")
        if end > begin:
            buffer = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(buffer) != end - begin:
                    raise CheckpointError(f"{self.path}: truncated while reading {name}")
        return out


class TensorSource:
    """All tensors of a checkpoint folder: one model.safetensors, shards named by an index JSON, or both."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = next(iter(sorted(self.directory.glob("*.safetensors.index.json"))), None)
        if index is not None:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.directory / shard for name, shard in weight_map.items()}
            missing = sorted({str(p.name) for p in files.values() if not p.exists()})
            if missing:
                raise CheckpointError(f"{index}: names shards that are not in {self.directory}: {missing}")
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                found = sorted(p.name for p in self.directory.iterdir())
                hint = " (pickled .bin weights are not loaded: re-save them with safetensors)" if any(
                    n.endswith(".bin") for n in found) else ""
                raise CheckpointError(f"{self.directory}: no *.safetensors weights here{hint}; found {found}")
            files = {}
            for shard in shards:
                for name in TensorFile(shard).entries:
                    files[name] = shard
        self._files: dict[Path, TensorFile] = {}
        self.location = files

    def file(self, name: str) -> TensorFile:
        path = self.location[name]
        if path not in self._files:
            self._files[path] = TensorFile(path)
        return self._files[path]

    def names(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.file(name).dtype(name)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.file(name).read(name, out)


def write_tensors(path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                  tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors arriving one by one in `layout` order; the file appears (atomically) only when complete."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    expected = iter(layout)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, tensor in tensors:
            want_name, want_shape, want_dtype = next(expected)
            if (name, tuple(tensor.shape), tensor.dtype) != (want_name, want_shape, want_dtype):
                raise CheckpointError(f"{path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, layout says "
                                      f"{want_name} {want_shape} {want_dtype}")
            if tensor.numel():
                f.write(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise CheckpointError(f"{path}: fewer tensors arrived than the layout lists")
    return Path(path)


def iter_state(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    for name in source.names():
        yield name, source.read(name)

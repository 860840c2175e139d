"""safetensors files: streamed writing, and reading the header without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the tensors' bytes. It holds no code (unlike a pickle), and
loading maps it into memory instead of unpickling it.

`write_safetensors` writes one tensor at a time, so converting a checkpoint never holds more than
one tensor of it, and computes the file's sha256 on the way, so the manifest costs no second read.
The header is known before any tensor is produced, because every tensor's name, dtype and shape
is planned up front.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import WeightsFormatError

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
# The spec's limit; a larger header means a corrupted length field.
MAX_HEADER_BYTES = 100_000_000
# Tensor data starts on a multiple of this, as the safetensors library writes it, so that every
# tensor is aligned for memory-mapping.
DATA_ALIGNMENT = 8

# safetensors dtype codes → their size in bytes
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
DTYPE_SIZES |= {"U8": 1, "BOOL": 1}
# safetensors dtype codes → torch dtype names
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_NAMES |= {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8"}
DTYPE_NAMES |= {"U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class FileRecord:
    """A file's sha256 and size: what a manifest knows of it."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, and the dtype and shape it will have in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, code_name in DTYPE_NAMES.items():
        if code_name == name:
            return code
    raise ValueError(f"safetensors cannot store {dtype}")


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write ``specs`` to ``path`` in order, calling ``produce(spec)`` for each tensor's values.

    The file appears only once complete (it is written to ``<path>.part`` and renamed).
    ``on_bytes(n)`` is called after each tensor, for a progress bar. Returns the file's size and
    sha256. Raises ValueError when a produced tensor has another dtype or shape than its spec.
    """
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        size = math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()
        header[spec.name] = {
            "dtype": dtype_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % DATA_ALIGNMENT)

    digest = hashlib.sha256()
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with part.open("wb") as out:
            for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
                out.write(chunk)
                digest.update(chunk)
            for spec in specs:
                tensor = produce(spec)
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(
                        f"{spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                        f"planned {spec.dtype} {spec.shape}"
                    )
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                out.write(data.data)
                digest.update(data.data)
                if on_bytes is not None:
                    on_bytes(data.nbytes)
                del tensor, data
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return FileRecord(sha256=digest.hexdigest(), size=8 + len(header_bytes) + offset)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (no torch needed).

    Raises WeightsFormatError naming the file when the header is unreadable or the file is
    shorter (truncated) or longer than its header says.
    """
    path = Path(path)
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        raw_length = file.read(8)
        if len(raw_length) < 8:
            raise WeightsFormatError(f"{path} is truncated ({size} bytes); download it again")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsFormatError(
                f"{path} is truncated or corrupted: its header claims {length} bytes, the file "
                f"has {size}; download or convert it again"
            )
        try:
            header = json.loads(file.read(length))
        except ValueError as err:
            raise WeightsFormatError(
                f"{path} has a corrupted header ({err}); download or convert it again"
            ) from err
    if not isinstance(header, dict):
        raise WeightsFormatError(f"{path} has a corrupted header; download or convert it again")
    data_size = max(
        (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
        default=0,
    )
    if 8 + length + data_size != size:
        state = "truncated" if 8 + length + data_size > size else "longer than its header says"
        raise WeightsFormatError(
            f"{path} is {state} ({size} bytes, expected {8 + length + data_size}); download or "
            "convert it again"
        )
    return header


def header_dtypes(header: dict[str, Any]) -> list[str]:
    """The torch dtype names in a header, most used first (by bytes)."""
    totals: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = DTYPE_NAMES.get(entry["dtype"], entry["dtype"])
        totals[dtype] = totals.get(dtype, 0) + end - start
    return sorted(totals, key=lambda dtype: -totals[dtype])

"""Reading Flax checkpoints (``flax_model.msgpack``) without JAX or Flax, in bounded memory.

``flax.serialization.to_bytes`` writes a parameter tree as msgpack: nested maps with string keys,
and each array as an ext object of type 1 whose payload is itself msgpack,
``[shape, dtype name, C-order bytes]``. An array over 2**30 bytes is split into a map
``{"__msgpack_chunked_array__": True, "shape": {"0": d0, …}, "chunks": {"0": <1-D array>, …}}``.

``msgpack.unpackb`` would copy every array into memory, and DALL·E Mega's checkpoint is 10.4 GB of
float32. Instead `FlaxCheckpoint` memory-maps the file and walks its msgpack structure itself,
recording where each array's bytes lie; an array is read only when it is converted, one slice
(one layer of a scanned stack) at a time. Memory use is then about one layer's tensors, whatever
the checkpoint's size. (The map is used to walk the structure; array bytes are read with
plain reads, so they do not stay mapped into the process.)

Errors:
    WeightsFormatError   the file is not a Flax msgpack checkpoint, or is truncated
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from model.errors import WeightsFormatError

# flax.serialization._MsgpackExtType
EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_ARRAY_MARKER = "__msgpack_chunked_array__"

FlaxKey = tuple[str, ...]

# numpy dtype names (what flax writes) → torch dtypes. bfloat16 is not a numpy dtype; JAX writes
# its name all the same.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def flax_key_name(key: FlaxKey) -> str:
    """A key path as a message shows it: ``model/encoder/embed_tokens/embedding``."""
    return "/".join(key)


@dataclass(frozen=True)
class _Segment:
    """A run of an array's elements stored contiguously in the file."""

    offset: int  # byte offset of the first element in the file
    count: int  # elements


class FlaxArray:
    """An array of a checkpoint, not yet read: its shape, dtype, and where its bytes are."""

    def __init__(
        self,
        checkpoint: FlaxCheckpoint,
        shape: tuple[int, ...],
        dtype_name: str,
        segments: list[_Segment],
    ) -> None:
        self._checkpoint = checkpoint
        self.shape = shape
        self.dtype_name = dtype_name
        self.dtype = TORCH_DTYPES[dtype_name]
        self._segments = segments

    def __repr__(self) -> str:
        return f"FlaxArray(shape={self.shape}, dtype={self.dtype_name})"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def read(self, index: int | None = None) -> torch.Tensor:
        """The whole array, or with ``index`` its sub-array ``[index]`` along the first axis.

        The bytes are copied out of the mapped file, so the tensor owns its memory.
        """
        if index is None:
            start, shape = 0, self.shape
        else:
            if not self.shape or not 0 <= index < self.shape[0]:
                raise IndexError(f"index {index} out of range for shape {self.shape}")
            shape = self.shape[1:]
            start = index * math.prod(shape)
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=self.dtype)
        return self._read_flat(start, count).view(self.dtype).reshape(shape)

    def _read_flat(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened array, as raw bytes (uint8)."""
        itemsize = self.itemsize
        out = bytearray(count * itemsize)
        written = 0
        position = 0  # element index where the current segment starts
        for segment in self._segments:
            lo = max(start, position)
            hi = min(start + count, position + segment.count)
            if lo < hi:
                offset = segment.offset + (lo - position) * itemsize
                size = (hi - lo) * itemsize
                self._checkpoint._read_into(memoryview(out)[written : written + size], offset)
                written += size
            position += segment.count
        assert written == count * itemsize
        return torch.frombuffer(out, dtype=torch.uint8)


class FlaxCheckpoint:
    """A ``flax_model.msgpack`` file, memory-mapped, with its arrays indexed by key path.

    Use it as a context manager; arrays can be read until it is closed::

        with FlaxCheckpoint(path) as checkpoint:
            for key, array in checkpoint.arrays.items():
                tensor = array.read()
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("rb")
        try:
            size = self.path.stat().st_size
            if size == 0:
                raise WeightsFormatError(f"{self.path} is empty; download it again")
            self._map: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            self.arrays: dict[FlaxKey, FlaxArray] = {}
            self.other_leaves: dict[FlaxKey, Any] = {}
            try:
                self._index()
            except (IndexError, struct.error, ValueError, KeyError, UnicodeDecodeError) as err:
                raise WeightsFormatError(
                    f"cannot read {self.path} as a Flax msgpack checkpoint ({err}). The file is "
                    "truncated or corrupted, or not a flax_model.msgpack; download it again."
                ) from err
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FlaxCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
            self._view = None  # type: ignore[assignment]
        if getattr(self, "_map", None) is not None:
            assert self._map is not None
            self._map.close()
            self._map = None
        self._file.close()

    def __iter__(self) -> Iterator[FlaxKey]:
        return iter(self.arrays)

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset``.

        A plain read rather than a copy out of the mapping: mapped pages would count towards
        this process's memory (up to the whole checkpoint), while read pages stay in the page
        cache only.
        """
        if self._view is None:
            raise ValueError(f"{self.path} is closed")
        done = 0
        while done < len(buffer):
            count = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            if count <= 0:
                raise WeightsFormatError(f"{self.path} ended early (truncated?)")
            done += count

    # -- walking the msgpack structure ---------------------------------------------------------

    def _index(self) -> None:
        root, end = self._value(0, ())
        if end != len(self._view):
            raise ValueError(f"{len(self._view) - end} unexpected bytes after the parameter tree")
        if not isinstance(root, dict):
            raise ValueError("the top level is not a map of parameters")
        self._collect(root, ())

    def _collect(self, tree: dict[str, Any], prefix: FlaxKey) -> None:
        for name, value in tree.items():
            key = (*prefix, name)
            if isinstance(value, FlaxArray):
                self.arrays[key] = value
            elif isinstance(value, dict):
                self._collect(value, key)
            else:
                self.other_leaves[key] = value

    def _value(self, pos: int, key: FlaxKey) -> tuple[Any, int]:
        """Decode the msgpack object at ``pos``; return it and the position after it.

        Arrays (ext type 1) become `FlaxArray`s that point into the file. ``key`` is the path
        of this object, for error messages.
        """
        view = self._view
        marker = view[pos]
        pos += 1
        if marker <= 0x7F:  # positive fixint
            return marker, pos
        if marker >= 0xE0:  # negative fixint
            return marker - 0x100, pos
        if 0x80 <= marker <= 0x8F:
            return self._map_items(pos, marker & 0x0F, key)
        if 0x90 <= marker <= 0x9F:
            return self._array_items(pos, marker & 0x0F, key)
        if 0xA0 <= marker <= 0xBF:
            return self._str(pos, marker & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if marker in simple:
            return simple[marker], pos
        if marker in _SIZED:  # bin, str, ext, array and map with an explicit length
            kind, length_format = _SIZED[marker]
            (length,) = struct.unpack_from(length_format, view, pos)
            pos += struct.calcsize(length_format)
            if kind == "bin":
                self._check_span(pos, length)
                return bytes(view[pos : pos + length]), pos + length
            if kind == "str":
                return self._str(pos, length)
            if kind == "array":
                return self._array_items(pos, length, key)
            if kind == "map":
                return self._map_items(pos, length, key)
            (code,) = struct.unpack_from(">b", view, pos)
            return self._ext(code, pos + 1, length, key)
        if 0xD4 <= marker <= 0xD8:  # fixext 1, 2, 4, 8, 16
            (code,) = struct.unpack_from(">b", view, pos)
            return self._ext(code, pos + 1, 1 << (marker - 0xD4), key)
        if marker in _NUMBERS:
            number_format = _NUMBERS[marker]
            (number,) = struct.unpack_from(number_format, view, pos)
            return number, pos + struct.calcsize(number_format)
        raise ValueError(f"invalid msgpack type byte 0x{marker:02x} at offset {pos - 1}")

    def _str(self, pos: int, length: int) -> tuple[str, int]:
        self._check_span(pos, length)
        return bytes(self._view[pos : pos + length]).decode("utf-8"), pos + length

    def _check_span(self, pos: int, length: int) -> tuple[int, int]:
        if pos + length > len(self._view):
            raise ValueError(
                f"an object at offset {pos} needs {length} bytes, but the file ends at "
                f"{len(self._view)} (truncated)"
            )
        return pos, length

    def _array_items(self, pos: int, count: int, key: FlaxKey) -> tuple[list[Any], int]:
        items = []
        for _ in range(count):
            item, pos = self._value(pos, key)
            items.append(item)
        return items, pos

    def _map_items(self, pos: int, count: int, key: FlaxKey) -> tuple[Any, int]:
        items: dict[str, Any] = {}
        for _ in range(count):
            name, pos = self._value(pos, key)
            if not isinstance(name, str):
                raise ValueError(f"a key under {flax_key_name(key) or 'the top level'} is {name!r}")
            items[name], pos = self._value(pos, (*key, name))
        if items.get(CHUNKED_ARRAY_MARKER) is True:
            return self._unchunk(items, key), pos
        return items, pos

    def _ext(self, code: int, pos: int, length: int, key: FlaxKey) -> tuple[Any, int]:
        self._check_span(pos, length)
        end = pos + length
        if code not in (EXT_NDARRAY, EXT_NPSCALAR):
            if code == EXT_NATIVE_COMPLEX:
                return complex(*self._value(pos, key)[0]), end
            raise ValueError(f"{flax_key_name(key)} has unknown msgpack ext type {code}")
        # Payload: [shape, dtype name, bytes], itself msgpack.
        header, data_pos = self._value_header(pos, key)
        shape, dtype_name = header
        data_start, data_length = data_pos
        if data_start + data_length != end:
            raise ValueError(f"{flax_key_name(key)}: array payload does not fill its ext object")
        if dtype_name not in TORCH_DTYPES:
            raise ValueError(f"{flax_key_name(key)} has unsupported dtype {dtype_name!r}")
        array = FlaxArray(self, shape, dtype_name, [_Segment(data_start, math.prod(shape))])
        if data_length != math.prod(shape) * array.itemsize:
            raise ValueError(
                f"{flax_key_name(key)}: {data_length} bytes for shape {shape} of {dtype_name}"
            )
        if code == EXT_NPSCALAR:
            return array.read().item(), end
        return array, end

    def _value_header(
        self, pos: int, key: FlaxKey
    ) -> tuple[tuple[tuple[int, ...], str], tuple[int, int]]:
        """Parse an ndarray payload's ``[shape, dtype, data]`` without touching the data."""
        marker = self._view[pos]
        if marker != 0x93:  # fixarray of 3
            raise ValueError(f"{flax_key_name(key)}: array payload is not [shape, dtype, data]")
        shape, pos = self._value(pos + 1, key)
        dtype_name, pos = self._value(pos, key)
        if isinstance(dtype_name, bytes):
            dtype_name = dtype_name.decode()
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{flax_key_name(key)}: invalid shape {shape!r}")
        data_marker = self._view[pos]
        if data_marker in _SIZED and _SIZED[data_marker][0] in ("bin", "str"):
            length_format = _SIZED[data_marker][1]
            (length,) = struct.unpack_from(length_format, self._view, pos + 1)
            start = pos + 1 + struct.calcsize(length_format)
        elif 0xA0 <= data_marker <= 0xBF:  # fixstr: old msgpack wrote bytes as str
            length, start = data_marker & 0x1F, pos + 1
        else:
            raise ValueError(f"{flax_key_name(key)}: array data is not a byte string")
        self._check_span(start, length)
        return (tuple(shape), str(dtype_name)), (start, length)

    def _unchunk(self, items: dict[str, Any], key: FlaxKey) -> FlaxArray:
        """flax's chunked form of a large array → one FlaxArray over all its chunks."""
        shape_map, chunk_map = items.get("shape"), items.get("chunks")
        if not isinstance(shape_map, dict) or not isinstance(chunk_map, dict):
            raise ValueError(f"{flax_key_name(key)}: malformed chunked array")
        shape = tuple(shape_map[str(i)] for i in range(len(shape_map)))
        chunks = [chunk_map[str(i)] for i in range(len(chunk_map))]
        if not chunks or not all(isinstance(chunk, FlaxArray) for chunk in chunks):
            raise ValueError(f"{flax_key_name(key)}: malformed chunked array")
        dtype_names = {chunk.dtype_name for chunk in chunks}
        if len(dtype_names) != 1:
            raise ValueError(f"{flax_key_name(key)}: chunks of different dtypes {dtype_names}")
        segments = [segment for chunk in chunks for segment in chunk._segments]
        if sum(segment.count for segment in segments) != math.prod(shape):
            raise ValueError(f"{flax_key_name(key)}: chunks do not add up to shape {shape}")
        return FlaxArray(self, shape, dtype_names.pop(), segments)


# marker byte → (kind, struct format of its length)
_SIZED = {
    0xC4: ("bin", ">B"),
    0xC5: ("bin", ">H"),
    0xC6: ("bin", ">I"),
    0xC7: ("ext", ">B"),
    0xC8: ("ext", ">H"),
    0xC9: ("ext", ">I"),
    0xD9: ("str", ">B"),
    0xDA: ("str", ">H"),
    0xDB: ("str", ">I"),
    0xDC: ("array", ">H"),
    0xDD: ("array", ">I"),
    0xDE: ("map", ">H"),
    0xDF: ("map", ">I"),
}
# marker byte → struct format of the number that follows
_NUMBERS = {
    0xCA: ">f",
    0xCB: ">d",
    0xCC: ">B",
    0xCD: ">H",
    0xCE: ">I",
    0xCF: ">Q",
    0xD0: ">b",
    0xD1: ">h",
    0xD2: ">i",
    0xD3: ">q",
}

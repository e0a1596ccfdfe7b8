"""emo's GGUF reader: header, metadata and tensor table of a memory-mapped file, nothing eager.

gguf-py's GGUFReader turns every value into numpy objects as it parses: a 100k-token vocabulary
(~108k strings in tokenizer.ggml.tokens/merges) costs it seconds, paid on every `emo chat`. Here
the header is parsed with `struct` on the map, a string array is only walked for its end offsets
(one tight loop; decoded when asked for), numeric arrays stay numpy views, and a tensor's bytes
are a view made on access, so opening touches no tensor data (the runtime's prefetch does).

The objects answer what emo used of gguf-py's reader: `fields` / `get_field(key)` with
`.types` and `.contents()`, `tensors` with name, tensor_type, shape (GGUF `ne` order), n_elements,
n_bytes, data_offset and `.data` (typed for float/int types, raw bytes shaped by row otherwise,
as gguf-py shapes them), and `data`, the whole map. Only little-endian GGUF v2/v3 is read.

Every count and length is checked against the bytes left before it is used: a damaged or hostile
file is one `GGUFFormatError` (a ValueError) naming what is wrong, never a huge allocation.
"""

from __future__ import annotations

import math
import mmap
import struct
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: llama.cpp refuses more

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {  # value type -> (struct, numpy dtype of an array of them)
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
    GGUFValueType.BOOL: (struct.Struct("<?"), np.dtype("?")),
}
# Tensor types gguf-py hands out as typed arrays; every other type is raw bytes, one row per ne[0].
_TYPED = {GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
          GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
          GGMLQuantizationType.I64: "<i8"}
# The smallest encodings, so a count can be checked against the bytes left before anything is built:
# a key/value is a key length, a type and at least one byte; a tensor-info entry a name length,
# n_dims, type and offset.
_MIN_KV, _MIN_TENSOR_INFO = 8 + 4 + 1, 8 + 4 + 4 + 8


class GGUFFormatError(ValueError):
    """What makes the bytes not a GGUF file emo reads, in a few words."""


class Field:
    """One metadata key/value. `types` as gguf-py: [type] or [ARRAY, item type]."""

    __slots__ = ("_file", "_value", "count", "name", "offset", "types", "value_offset")

    def __init__(self, file: GGUFFile, name: str, offset: int, types: list, value_offset: int, count: int,
                 value: Any):
        self._file, self.name, self.offset, self.types = file, name, offset, types
        self.value_offset, self.count, self._value = value_offset, count, value

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        """The value: a Python scalar or str, or a list of them (one item for an int index).
        Strings are decoded here, so bad UTF-8 raises UnicodeDecodeError here, not at open."""
        mm, kind = self._file.mm, self.types[0]
        if kind == GGUFValueType.STRING:
            return mm[self.value_offset + 8:self._value].decode("utf-8")
        if kind != GGUFValueType.ARRAY:
            return self._value
        if self.types[1] != GGUFValueType.STRING:
            return self.array()[index_or_slice].tolist()
        ends = self._value  # end offset of each string; string i starts 8 bytes after the previous end
        idx = range(self.count)[index_or_slice]
        if isinstance(idx, int):
            return mm[(ends[idx - 1] if idx else self.value_offset) + 8:ends[idx]].decode("utf-8")
        starts = array("Q", [self.value_offset])
        starts.extend(ends[:-1])
        pairs = zip(starts[index_or_slice], ends[index_or_slice])
        return [mm[s + 8:e].decode("utf-8") for s, e in pairs]

    def array(self) -> np.ndarray:
        """A numeric array value as a read-only numpy view of the file."""
        if self.types[0] != GGUFValueType.ARRAY or self.types[1] == GGUFValueType.STRING:
            raise TypeError(f"GGUF key {self.name} is not a numeric array")
        dtype = _SCALARS[self.types[1]][1]
        return self._file.data[self.value_offset:self.value_offset + self.count * dtype.itemsize].view(dtype)

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {'/'.join(t.name for t in self.types)}, count={self.count})"


class Tensor:
    """One tensor-info entry. `shape` is GGUF's `ne` (fastest axis first); `data_offset` is absolute."""

    __slots__ = ("_file", "data_offset", "info_offset", "n_bytes", "n_elements", "name", "shape", "tensor_type")

    def __init__(self, file: GGUFFile, name: str, tensor_type: GGMLQuantizationType, shape: tuple[int, ...],
                 n_elements: int, n_bytes: int, data_offset: int, info_offset: int):
        self._file, self.name, self.tensor_type, self.shape = file, name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self.info_offset = n_elements, n_bytes, data_offset, info_offset

    @property
    def data(self) -> np.ndarray:
        """A zero-copy view of the tensor's bytes in numpy order (reversed `ne`): typed for float and
        int types, else uint8 [..., bytes of one row]; made on each access, so pages fault in on use."""
        raw = self._file.data[self.data_offset:self.data_offset + self.n_bytes]
        dims = tuple(reversed(self.shape))
        dtype = _TYPED.get(self.tensor_type)
        if dtype is not None:
            return raw.view(dtype).reshape(dims)
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        dims = dims or (1,)
        return raw.reshape(*dims[:-1], dims[-1] // block * size)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.tensor_type.name}, {list(self.shape)})"


class GGUFFile:
    """A GGUF file, memory-mapped read-only and parsed up to the start of the tensor data."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file() and not self.path.is_dir():
            raise GGUFFormatError("not a regular file")  # a FIFO or device: open() could block
        with open(self.path, "rb") as f:
            try:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # mmap of an empty file
                raise GGUFFormatError("the file is empty") from None
        self.data = np.frombuffer(self.mm, dtype=np.uint8)  # the whole file; read-only like the map
        self.size = len(self.mm)
        self.fields: dict[str, Field] = {}
        self.tensors: list[Tensor] = []
        self._parse()

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)

    def get_tensor(self, idx: int) -> Tensor:
        return self.tensors[idx]

    # ---- parsing ------------------------------------------------------------------------------
    def _need(self, pos: int, n: int, what: str) -> int:
        """pos + n, if n bytes from pos are in the file."""
        if n > self.size - pos:
            raise GGUFFormatError(f"{what} runs past the end of the file")
        return pos + n

    def _u32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return _U32.unpack_from(self.mm, pos)[0]

    def _u64(self, pos: int, what: str) -> int:
        self._need(pos, 8, what)
        return _U64.unpack_from(self.mm, pos)[0]

    def _str(self, pos: int, what: str) -> tuple[str, int]:
        end = self._need(pos + 8, self._u64(pos, what), what)
        try:
            return self.mm[pos + 8:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} is not UTF-8") from None

    def _parse(self) -> None:
        if self.mm[:4] != MAGIC:
            raise GGUFFormatError("no GGUF magic")
        version = self._u32(4, "the header")
        if version not in VERSIONS:
            if version and not version & 0xFFFF:  # a small version number read with the wrong byte order
                raise GGUFFormatError("a big-endian GGUF; emo reads little-endian files")
            raise GGUFFormatError(f"GGUF version {version}; emo reads versions 2 and 3")
        n_tensors, n_kv = self._u64(8, "the header"), self._u64(16, "the header")
        for name, offset, vtype, value in (("GGUF.version", 4, GGUFValueType.UINT32, version),
                                           ("GGUF.tensor_count", 8, GGUFValueType.UINT64, n_tensors),
                                           ("GGUF.kv_count", 16, GGUFValueType.UINT64, n_kv)):
            self.fields[name] = Field(self, name, offset, [vtype], offset, 1, value)
        if n_kv > (self.size - 24) // _MIN_KV:
            raise GGUFFormatError(f"metadata count {n_kv} is more than the file can hold")
        pos = 24
        for _ in range(n_kv):
            pos = self._parse_kv(pos)
        if n_tensors > (self.size - pos) // _MIN_TENSOR_INFO:
            raise GGUFFormatError(f"tensor count {n_tensors} is more than the file can hold")
        infos = []
        for _ in range(n_tensors):
            info, pos = self._parse_tensor_info(pos)
            infos.append(info)
        self.alignment = DEFAULT_ALIGNMENT
        align = self.fields.get("general.alignment")
        if align is not None:
            if align.types != [GGUFValueType.UINT32] or not align._value or align._value & (align._value - 1):
                raise GGUFFormatError("general.alignment is not a power of two (uint32)")
            self.alignment = align._value
        self.data_offset = pos + (-pos % self.alignment)
        self._build_tensors(infos)

    def _parse_kv(self, pos: int) -> int:
        start = pos
        key, pos = self._str(pos, "a metadata key")
        if key in self.fields:
            raise GGUFFormatError(f"metadata key {key[:60]} appears twice")
        vtype = self._value_type(self._u32(pos, f"metadata {key[:60]}"), key)
        pos += 4
        what = f"the value of {key[:60]}"
        if vtype == GGUFValueType.STRING:
            end = self._need(pos + 8, self._u64(pos, what), what)
            self.fields[key] = Field(self, key, start, [vtype], pos, 1, end)
            return end
        if vtype != GGUFValueType.ARRAY:
            st = _SCALARS[vtype][0]
            end = self._need(pos, st.size, what)
            self.fields[key] = Field(self, key, start, [vtype], pos, 1, st.unpack_from(self.mm, pos)[0])
            return end
        itype = self._value_type(self._u32(pos, what), key)
        count = self._u64(pos + 4, what)
        pos += 12
        if itype == GGUFValueType.ARRAY:
            raise GGUFFormatError(f"{key[:60]} is an array of arrays, which emo does not read")
        if itype == GGUFValueType.STRING:
            if count > (self.size - pos) // 8:
                raise GGUFFormatError(f"{what} claims {count} strings, more than the file can hold")
            ends, end = self._walk_strings(pos, count, what)
        else:
            ends, end = None, self._need(pos, count * _SCALARS[itype][1].itemsize, what)
        self.fields[key] = Field(self, key, start, [vtype, itype], pos, count, ends)
        return end

    def _walk_strings(self, pos: int, count: int, what: str) -> tuple[array, int]:
        """The end offset of each of `count` length-prefixed strings from pos, and the last end.
        The hot loop of opening a file with a big vocabulary: one unpack and one append per string;
        a length past the file makes the next unpack fail (or the final check)."""
        ends = array("Q")  # 8 bytes per string, never more than the bytes walked
        append, unpack, mm = ends.append, _U64.unpack_from, self.mm
        try:
            for _ in range(count):
                pos += 8 + unpack(mm, pos)[0]
                append(pos)
        except (struct.error, OverflowError):
            raise GGUFFormatError(f"{what} runs past the end of the file") from None
        if pos > self.size:
            raise GGUFFormatError(f"{what} runs past the end of the file")
        return ends, pos

    @staticmethod
    def _value_type(raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFFormatError(f"{key[:60]} has unknown value type {raw}") from None

    def _parse_tensor_info(self, pos: int) -> tuple[tuple, int]:
        start = pos
        name, pos = self._str(pos, "a tensor name")
        what = f"tensor {name[:60]}"
        n_dims = self._u32(pos, what)
        if n_dims > MAX_DIMS:
            raise GGUFFormatError(f"{what} has {n_dims} dimensions (GGUF allows {MAX_DIMS})")
        self._need(pos + 4, 8 * n_dims + 12, what)
        shape = struct.unpack_from(f"<{n_dims}Q", self.mm, pos + 4)
        pos += 4 + 8 * n_dims
        raw_type, offset = _U32.unpack_from(self.mm, pos)[0], _U64.unpack_from(self.mm, pos + 4)[0]
        return (name, shape, raw_type, offset, start), pos + 12

    def _build_tensors(self, infos: list[tuple]) -> None:
        names = set()
        for name, shape, raw_type, offset, info_offset in infos:
            what = f"tensor {name[:60]}"
            if name in names:
                raise GGUFFormatError(f"{what} appears twice")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{what} has unknown type {raw_type}") from None
            spread = 1  # the element count numpy would check, zero-length axes counted as 1
            for d in shape:
                spread *= max(d, 1)
            if spread >= 2**60:
                raise GGUFFormatError(f"{what} has an impossible shape {list(shape)}")
            n, row = math.prod(shape), shape[0] if shape else 1
            if row % block:
                raise GGUFFormatError(f"{what} rows of {row} are not whole {qtype.name} blocks of {block}")
            n_bytes = n // block * size
            at = self.data_offset + offset
            if at + n_bytes > self.size:
                raise GGUFFormatError(f"{what} lies outside the file (truncated download?)")
            self.tensors.append(Tensor(self, name, qtype, tuple(shape), n, n_bytes, at, info_offset))


def open_gguf(path: Path | str) -> GGUFFile:
    return GGUFFile(path)

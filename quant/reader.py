"""WAN GGUF files -> torch state dicts, without ComfyUI.

Quantized tensors stay as their raw bytes in :class:`GGUFWeight` (moved and swapped as bytes,
dequantized on the GPU inside the layer); float tensors come back as plain tensors. Both alias
the file's read-only memory map: nothing is copied into RAM at load time.
"""

from __future__ import annotations

import copy
import logging
import math
import mmap
import os
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .dequant import SUPPORTED_TYPES, dequantize, is_quantized

logger = logging.getLogger(__name__)

WAN_ARCHITECTURE = "wan"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


# --------------------------------------------------------------------------------------------
# GGUFWeight
# --------------------------------------------------------------------------------------------


def _copy_gguf_attrs(src: GGUFWeight, dst: torch.Tensor) -> GGUFWeight:
    out = dst if isinstance(dst, GGUFWeight) else dst.as_subclass(GGUFWeight)
    out.tensor_type = src.tensor_type
    out.tensor_shape = src.tensor_shape
    # A fresh list: appending a LoRA patch to one copy must not patch the other.
    out.patches = list(src.patches)
    return out


def _keeps_raw_dtype(kwargs: Mapping[str, Any]) -> bool:
    return kwargs.get("dtype") in (None, torch.uint8)


def _check_to_dtype(args: tuple, kwargs: Mapping[str, Any]) -> None:
    parse_kwargs = {k: v for k, v in kwargs.items() if k != "copy"}  # _parse_to rejects copy=
    _device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args[1:], **parse_kwargs)
    if dtype is not None and dtype != torch.uint8:
        raise TypeError(
            f"GGUFWeight holds raw quantized bytes; .to({dtype}) would reinterpret them. "
            "Use .dequantize(dtype) to get values."
        )


class GGUFWeight(torch.Tensor):
    """Raw bytes (uint8) of a GGML-quantized weight plus what is needed to decode them.

    ``.shape`` is the raw byte shape (so byte counts stay honest); ``tensor_shape`` is the
    logical torch-order shape, ``tensor_type`` the GGML type, ``patches`` LoRA patches that a
    layer applies after :meth:`dequantize`. Moving (``to``/``cuda``/``cpu``/``pin_memory``),
    ``detach``, ``clone`` (a real copy), ``new_empty``, ``empty_like`` and ``param.data`` keep
    these attributes; every other op returns a plain tensor, because a slice or a reshape of
    quantized bytes is no longer a decodable weight.
    """

    tensor_type: GGMLQuantizationType
    tensor_shape: torch.Size
    patches: list

    # Ops whose result is the same bytes (or a same-sized buffer for them) and so the same weight.
    _KEEPS_ATTRS = {
        torch.Tensor.to,
        torch.Tensor.cuda,
        torch.Tensor.cpu,
        torch.Tensor.detach,
        torch.Tensor.clone,
        torch.Tensor.contiguous,
        torch.Tensor.pin_memory,
        torch.Tensor.data.__get__,
    }
    _KEEPS_ATTRS_SAME_DTYPE = {torch.Tensor.new_empty, torch.empty_like}

    def __new__(
        cls,
        data: torch.Tensor,
        *,
        tensor_type: GGMLQuantizationType | int,
        tensor_shape: tuple[int, ...] | torch.Size,
        patches: list | None = None,
    ) -> GGUFWeight:
        if data.dtype != torch.uint8:
            raise TypeError(f"GGUFWeight data must be uint8 raw bytes, got {data.dtype}")
        t = torch.Tensor._make_subclass(cls, data, False)
        t.tensor_type = GGMLQuantizationType(tensor_type)
        t.tensor_shape = torch.Size(int(s) for s in tensor_shape)
        t.patches = list(patches) if patches is not None else []
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            _check_to_dtype(args, kwargs)
        # Run the op on plain tensors: torch's default would re-wrap every result as GGUFWeight
        # without attributes, which is how the weight of a sliced view would get lost silently.
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **kwargs)
        src = args[0] if args else None
        if not isinstance(ret, torch.Tensor) or not isinstance(src, GGUFWeight) or ret is src:
            return ret  # non-tensors, in-place ops returning self, no-op moves
        if func in cls._KEEPS_ATTRS or (func in cls._KEEPS_ATTRS_SAME_DTYPE and _keeps_raw_dtype(kwargs)):
            return _copy_gguf_attrs(src, ret)
        return ret

    def __deepcopy__(self, memo: dict) -> GGUFWeight:
        if id(self) in memo:
            return memo[id(self)]
        new = self.clone()
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"GGUFWeight(type={self.tensor_type.name}, shape={tuple(self.tensor_shape)}, "
            f"raw={tuple(self.shape)}, device={self.device}, patches={len(self.patches)})"
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The logical-shape values on this tensor's device (float32 when ``dtype`` is None).

        Applies nothing else: ``patches`` are the caller's business.
        """
        return dequantize(self, self.tensor_type, self.tensor_shape, dtype or torch.float32)


def is_gguf_weight(tensor: object) -> bool:
    """A quantized GGUF weight, ours (:class:`GGUFWeight`) or ComfyUI-GGUF's ``GGMLTensor``: raw bytes
    with a quant type and a LoRA list (``patches``) that the layer applies after dequantizing."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "tensor_type") and hasattr(tensor, "patches")


# --------------------------------------------------------------------------------------------
# Bounds from the file's size, before gguf's reader parses
# --------------------------------------------------------------------------------------------

# gguf's reader trusts the counts and lengths in the header: it loops over them (past the end of the
# file its reads come back empty and it keeps going) and builds Python objects per array entry. This pass
# only walks the header's lengths and counts, checking each against the bytes left; the reader still does
# the parse.
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dim count, type, offset
# WAN files carry a handful of short arrays (orig_shape); the reader keeps several objects per entry.
MAX_METADATA_ARRAY_ENTRIES = 1 << 16
DEFAULT_ALIGNMENT = 32


def _name(raw: bytes) -> str:
    """A tensor or key name for a message: damaged ones can be long runs of binary."""
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= 80 and text.isprintable() else repr(text[:60]) + "..."


class _HeaderCursor:
    def __init__(self, view: memoryview, path: str):
        self.view, self.pos, self.path = view, 0, path

    def left(self) -> int:
        return len(self.view) - self.pos

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise ValueError(
                f"{self.path} is truncated or damaged: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.left()} left"
            )
        self.pos += n

    def take(self, fmt: str, what: str) -> int:
        start = self.pos
        self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.view, start)[0]

    def string(self, what: str) -> bytes:
        n = self.take("<Q", f"the length of {what}")
        start = self.pos
        self.skip(n, what)
        return bytes(self.view[start : self.pos])


def _value_type(raw: int, path: str, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"{path}: metadata {key!r} has unknown value type {raw}") from None


def _skip_value(cur: _HeaderCursor, vtype: GGUFValueType, key: str, array_budget: list[int]) -> object:
    """Moves past one metadata value; returns it for the one field the layout needs (alignment)."""
    if vtype in _SCALAR_SIZES:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR_SIZES[vtype]]
        return cur.take(fmt, f"metadata {key!r}")
    if vtype == GGUFValueType.STRING:
        cur.string(f"metadata {key!r}")
        return None
    item_type = _value_type(cur.take("<I", f"metadata {key!r}"), cur.path, key)
    count = cur.take("<Q", f"metadata {key!r}")
    item_size = _SCALAR_SIZES.get(item_type, 8)  # a string entry is at least its 8-byte length
    if item_type == GGUFValueType.ARRAY:
        raise ValueError(f"{cur.path}: metadata {key!r} is an array of arrays, which no WAN model file has")
    array_budget[0] -= count
    if count * item_size > cur.left() or array_budget[0] < 0:
        raise ValueError(
            f"{cur.path} is damaged or not a WAN model file: metadata {key!r} is a metadata array of {count} "
            f"entries ({cur.left()} bytes left in the file; at most {MAX_METADATA_ARRAY_ENTRIES} entries in "
            "all are read)"
        )
    if item_type == GGUFValueType.STRING:
        for _ in range(count):
            cur.string(f"an entry of metadata {key!r}")
    else:
        cur.skip(count * item_size, f"metadata {key!r}")
    return None


def check_gguf_bounds(path: str) -> None:
    """Raise ValueError (naming the file) unless the header's counts, lengths and tensor byte ranges fit
    the file: tensors laid out one after another at aligned offsets, as llama.cpp's own loader requires,
    the last one ending where the file does. Files that are not GGUF at all are left to gguf's reader."""
    size = os.path.getsize(path)
    if size < 24:
        return  # the reader reports these (bad magic / short file)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            _check_layout(_HeaderCursor(view, path), size)
        finally:
            view.release()


def _element_count(dims: np.ndarray) -> int:
    """The product of a tensor's dimensions (a view of the header), exact (Python ints: no wrap-around)
    without turning a damaged count of millions of dimensions into as many Python ints."""
    if (dims == 0).any():
        return 0
    counted = dims[dims != 1]
    if len(counted) > 64:
        return 2**64 * math.prod(int(d) for d in counted[:64])  # each >= 2: more than any file holds
    return math.prod(int(d) for d in counted)


def _shape_text(dims: np.ndarray) -> str:
    return str(tuple(int(d) for d in dims)) if len(dims) <= 8 else f"of {len(dims)} dimensions"


def _check_layout(cur: _HeaderCursor, size: int) -> None:
    path = cur.path
    if bytes(cur.view[:4]) != b"GGUF":
        return
    cur.skip(4, "the magic")
    version = cur.take("<I", "the version")
    if version & 0xFFFF == 0:
        raise ValueError(f"{path} is a GGUF file for the other byte order ({sys.byteorder}-endian host)")
    if version not in (2, 3):
        return  # the reader names the version it cannot read
    n_tensors = cur.take("<Q", "the tensor count")
    n_kv = cur.take("<Q", "the metadata count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left():
        raise ValueError(
            f"{path}: its header announces {n_tensors} tensors and {n_kv} metadata entries, more than its "
            f"{size} bytes can hold (truncated or damaged)"
        )
    alignment = DEFAULT_ALIGNMENT
    array_budget = [MAX_METADATA_ARRAY_ENTRIES]
    for _ in range(n_kv):
        key = _name(cur.string("a metadata key"))
        vtype = _value_type(cur.take("<I", f"the type of metadata {key!r}"), path, key)
        value = _skip_value(cur, vtype, key, array_budget)
        if key == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = value
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment is {alignment}, not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = _name(cur.string("a tensor name"))
        # No cap at llama.cpp's 4 dims: gguf's writer stores a 5-D array (WAN's patch embedding) as it is
        # and its reader reads it back, as ComfyUI-GGUF does. The count is bounded by the bytes left.
        n_dims = cur.take("<I", f"the dimension count of tensor {name!r}")
        dims_at = cur.pos
        cur.skip(8 * n_dims, f"the shape of tensor {name!r} ({n_dims} dimensions)")
        raw_type = cur.take("<I", f"the type of tensor {name!r}")
        offset = cur.take("<Q", f"the offset of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {raw_type}") from None
        dims = np.frombuffer(cur.view, "<u8", n_dims, dims_at)
        elements, shape = _element_count(dims), _shape_text(dims)
        del dims  # a view of the map: the map is closed when this check ends
        tensors.append((name, offset, elements * type_size // block_size, shape))
    data_start = cur.pos + (-cur.pos % alignment)
    expected = 0
    for name, offset, nbytes, dims in tensors:
        if data_start + offset + nbytes > size:
            raise ValueError(
                f"{path}: tensor {name!r} (shape {dims}, {nbytes} bytes at offset {offset}) reaches past the "
                f"end of the file ({size} bytes): truncated or damaged"
            )
        if offset != expected:
            raise ValueError(
                f"{path}: tensor {name!r} starts at byte offset {offset} of the data, where the tensors "
                f"before it end at {expected}: damaged"
            )
        end = offset + nbytes
        expected = end + (-end % alignment)
    if tensors and size not in (data_start + end, data_start + expected):
        raise ValueError(
            f"{path}: its tensors end at byte {data_start + end} but the file has {size}: damaged "
            "(a tensor's type or shape does not match its data)"
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """Python value of a GGUFReader field (from its parts, which every gguf version has)."""
    types = list(field.types)
    if not types:
        return None

    def scalar(part: np.ndarray, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part[0].item()

    if types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], types[0])


def _open_reader(path: str) -> gguf.GGUFReader:
    try:
        # Mode "r": a read-only shared map. A copy-on-write map ("c") would make the arrays
        # writable, but on Windows it reserves commit charge for the whole file.
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, TypeError, OverflowError, KeyError) as exc:
        # GGUFReader reports bad magic, short reads and garbage headers in several ways.
        raise ValueError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    if reader.byte_order != "I":
        raise ValueError(f"{path} is a GGUF file for the other byte order ({sys.byteorder}-endian host)")
    return reader


def _orig_shape(reader: gguf.GGUFReader, name: str) -> torch.Size | None:
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    value = _field_value(field)
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"metadata {ORIG_SHAPE_KEY}{name} is not an integer array: {value!r}")
    if any(v < 0 for v in value):
        # Two negatives multiply to the stored count and reach torch's reshape, whose error names no file.
        raise ValueError(
            f"tensor {name!r}: {ORIG_SHAPE_KEY}{name} = {tuple(value)} has a negative dimension: damaged"
        )
    return torch.Size(value)


def _tensor_from_map(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The map is read-only and torch warns that it cannot express that. Nothing writes to these
        # tensors: the engine copies them into slabs, slots or staging buffers, or (the file tier) reads them
        # where they lie; a write would fault, so no code path may write into a file view.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _metadata(reader: gguf.GGUFReader, path: str, type_counts: Counter) -> dict[str, object]:
    meta: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", f"{WAN_ARCHITECTURE}.")):
            value = _field_value(field)
            if value is not None:
                meta[key] = value
    version = reader.get_field("GGUF.version")
    if version is not None:
        meta["gguf.version"] = _field_value(version)
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int):
        try:
            meta["gguf.file_type_name"] = gguf.LlamaFileType(file_type).name
        except ValueError:
            pass
    meta["gguf.tensor_types"] = dict(type_counts)
    meta["gguf.path"] = path
    return meta


def load_gguf_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Load a WAN GGUF file as ``(state_dict, metadata)`` without reading it into RAM.

    Float tensors (F32/F16/BF16) are plain tensors of their dtype and logical shape; quantized
    ones are :class:`GGUFWeight`. All alias the read-only file map: never write into them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")

    check_gguf_bounds(path)
    reader = _open_reader(path)
    arch_field = reader.get_field("general.architecture")
    arch = _field_value(arch_field) if arch_field is not None else None
    if arch != WAN_ARCHITECTURE:
        raise ValueError(
            f"{path}: GGUF architecture is {arch!r}, expected {WAN_ARCHITECTURE!r} "
            "(only WAN 2.1/2.2 diffusion models can be loaded here)"
        )

    state_dict: dict[str, torch.Tensor] = {}
    type_counts: Counter = Counter()
    for rt in reader.tensors:
        name, qtype = rt.name, GGMLQuantizationType(rt.tensor_type)
        if qtype not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has GGML type {qtype.name}, which is not supported")
        stored_shape = torch.Size(int(d) for d in reversed(rt.shape.tolist()))  # ggml order -> torch
        try:
            shape = _orig_shape(reader, name) or stored_shape
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if math.prod(shape) != math.prod(stored_shape):
            raise ValueError(
                f"{path}: tensor {name!r}: {ORIG_SHAPE_KEY}{name} = {tuple(shape)} does not match "
                f"its {math.prod(stored_shape)} stored elements"
            )
        data = _tensor_from_map(rt.data)
        if is_quantized(qtype):
            state_dict[name] = GGUFWeight(data, tensor_type=qtype, tensor_shape=shape)
        else:
            # gguf hands BF16 over as raw bytes; F32/F16 as typed arrays. View both as the dtype.
            state_dict[name] = data.view(torch.uint8).view(_FLOAT_DTYPES[qtype]).reshape(shape)
        type_counts[qtype.name] += 1

    meta = _metadata(reader, path, type_counts)
    summary = ", ".join(f"{n} {k}" for k, n in type_counts.most_common())
    logger.info(
        "[BlockSwap] Loaded GGUF %s: %d tensors (%s)", os.path.basename(path), len(state_dict), summary
    )
    return state_dict, meta

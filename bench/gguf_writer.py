"""Write WAN-shaped GGUF files for tests and benchmarks (not used at run time).

Lays files out like real WAN GGUF files: norms, modulation and embeddings unquantized, 5-D tensors folded
to 4-D with their real shape in ``comfy.gguf.orig_shape.<name>``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..quant.dequant import is_quantized
from ..quant.reader import ORIG_SHAPE_KEY, WAN_ARCHITECTURE, GGUFWeight

# Types numpy (gguf.quants.quantize) can produce.
WRITABLE_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q8_0,
    }
)

_KEEP_F32_NAMES = ("modulation", "patch_embedding")
_KEEP_F16_NAMES = ("norm", "embedding")

QTypePolicy = Mapping[str, GGMLQuantizationType] | Callable[[str, torch.Tensor], GGMLQuantizationType]


def _storage_type(name: str, tensor: torch.Tensor, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """Keep the tensors real WAN GGUF files keep unquantized in F32/F16."""
    if not is_quantized(requested):
        return requested
    if tensor.dim() <= 1 or any(k in name for k in _KEEP_F32_NAMES):
        return GGMLQuantizationType.F32
    if any(k in name for k in _KEEP_F16_NAMES):
        return GGMLQuantizationType.F16
    block_size = gguf.GGML_QUANT_SIZES[requested][0]
    if tensor.shape[-1] % block_size != 0:
        return GGMLQuantizationType.F16
    return requested


def _file_type(type_counts: Counter) -> int | None:
    quantized = [t for t, _ in type_counts.most_common() if is_quantized(t)]
    main = quantized[0] if quantized else (type_counts.most_common(1)[0][0] if type_counts else None)
    if main is None:
        return None
    for candidate in ("ALL_" + main.name, "MOSTLY_" + main.name, "MOSTLY_" + main.name + "_M"):
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    return None


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if value < 0:
            writer.add_int32(key, value)
        else:
            writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"unsupported metadata value for {key}: {type(value).__name__}")


def write_wan_gguf(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    qtypes: QTypePolicy,
    *,
    arch: str = WAN_ARCHITECTURE,
    metadata: Mapping[str, object] | None = None,
) -> dict[str, GGMLQuantizationType]:
    """Write ``state_dict`` as a GGUF file laid out like a real WAN GGUF; return each tensor's type.

    ``qtypes`` maps names to the wanted type (missing names: F16) or is ``f(name, tensor)``.
    Quantized types apply to weights only: 1-D tensors, modulation and patch_embedding are
    written as F32, other norms/embeddings as F16, and a tensor whose last dim does not fit the
    block size falls back to F16. Types numpy cannot quantize (K-quants, ...) are written by
    passing a :class:`GGUFWeight` with hand-built bytes; its type and bytes are written as they are.
    Tensors of more than 4 dims are stored as 4-D with a ``comfy.gguf.orig_shape.<name>`` field.
    """
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    written: dict[str, GGMLQuantizationType] = {}
    type_counts: Counter = Counter()
    try:
        for name, tensor in state_dict.items():
            if isinstance(tensor, GGUFWeight):
                qtype = tensor.tensor_type
                shape = tensor.tensor_shape
                data = tensor.as_subclass(torch.Tensor).detach().cpu().contiguous().numpy()
            else:
                shape = tensor.shape
                wanted = (
                    qtypes(name, tensor) if callable(qtypes) else qtypes.get(name, GGMLQuantizationType.F16)
                )
                qtype = _storage_type(name, tensor, GGMLQuantizationType(wanted))
                if qtype not in WRITABLE_TYPES:
                    raise ValueError(
                        f"{name}: numpy cannot quantize to {qtype.name}; pass a GGUFWeight with its bytes"
                    )
                data = gguf.quants.quantize(tensor.detach().to("cpu", torch.float32).numpy(), qtype)
            stored = tuple(int(s) for s in shape)
            if len(stored) > 4:
                # GGUF holds at most 4 dims; like ComfyUI's converter, fold the leading ones.
                writer.add_array(ORIG_SHAPE_KEY + name, list(stored))
                stored = (math.prod(stored[:-3]), *stored[-3:])
            if data.dtype == np.uint8:
                # Byte arrays (quantized, BF16) need their type; the writer derives the shape from them.
                data = data.reshape(gguf.quants.quant_shape_to_byte_shape(stored, qtype))
                writer.add_tensor(name, data, raw_dtype=qtype)
            else:
                writer.add_tensor(name, data.reshape(stored))
            written[name] = qtype
            type_counts[qtype] += 1
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        file_type = _file_type(type_counts)
        if file_type is not None:
            writer.add_file_type(file_type)
        for key, value in (metadata or {}).items():
            _add_metadata(writer, key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return written


def mixed_wan_qtypes(name: str, tensor: torch.Tensor) -> GGMLQuantizationType:
    """A K-less mix in the places real WAN GGUFs put quantized weights (tests and benchmarks): Q8_0 self
    attention, Q4_0 cross attention, Q5_1 feed-forward, BF16 time embedding, F16 for the rest (norms,
    modulation and the patch embedding become F32 in `write_wan_gguf`)."""
    if "self_attn" in name:
        return GGMLQuantizationType.Q8_0
    if "cross_attn" in name:
        return GGMLQuantizationType.Q4_0
    if "ffn" in name:
        return GGMLQuantizationType.Q5_1
    if name.startswith("time_"):
        return GGMLQuantizationType.BF16
    return GGMLQuantizationType.F16

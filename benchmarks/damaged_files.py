#!/usr/bin/env python3
"""Damaged WAN files through the WAN Model Loader: a seeded fuzz run (the host test runs a short one).

Each case takes a tiny undamaged WAN file (safetensors or GGUF), damages it one way (truncation, flipped
bits in the header, lying lengths and counts, offsets and shapes past the end, wrong dtypes, renamed or
missing tensors, malformed, nested or huge headers and metadata, non-WAN state dicts) and loads it with
``loader.load_wan_model`` in a worker process that has ComfyUI imported in CPU mode. Outcomes:

- ``refused``: a ValueError naming the file;
- ``accepted``: the model loaded and its diffusion-model weights equal the undamaged file's;
- ``unnamed`` (a ValueError without the file name), ``crash`` (any other exception), ``different``
  (loaded, but not the undamaged model), ``memory`` (peak RSS growth over the limit), ``hang`` (no answer
  within the per-case timeout) and ``died`` (the worker process ended): failures.

Workers run several cases each (starting ComfyUI takes seconds) under a per-case timeout kept by the
parent and an address-space cap (RLIMIT_AS: what the worker has mapped after start-up plus twice the
largest file plus a fixed allowance), so a hang or a blow-up ends the case instead of the run. Peak RSS is
measured per case (VmHWM after resetting it); the limit is 2x the file's size plus ``--rss-slack-mib``
(the fixed cost of building a ComfyUI model). A worker that hangs or dies is replaced.

    .venv/bin/python benchmarks/damaged_files.py --comfyui $HOME/comfy-hosts/0.33 --cases 2000
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import resource
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("safetensors", "gguf")
FAILURES = ("unnamed", "crash", "different", "memory", "hang", "died", "harness")
ORIGINAL = {"safetensors": "original.safetensors", "gguf": "original.gguf"}


# --------------------------------------------------------------------------------------------
# The undamaged files
# --------------------------------------------------------------------------------------------


_ORIGINAL_SD: dict = {}


def original_state_dict():
    """The undamaged weights (a fresh dict each call; built once per process)."""
    if not _ORIGINAL_SD:
        _ORIGINAL_SD.update(_build_state_dict())
    return dict(_ORIGINAL_SD)


def _build_state_dict():
    import dataclasses as dc

    import torch

    from wan22_blockswap.bench import synthetic_model

    shape = dc.replace(synthetic_model.PRESETS["tiny"], num_heads=1, num_layers=2)
    model = synthetic_model.build_model(shape, "t2v", seed=0)
    return {k: v.contiguous().to(torch.float32) for k, v in model.state_dict().items()}


def gguf_qtype(name: str, tensor):
    from wan22_blockswap.bench.gguf_writer import mixed_wan_qtypes

    return mixed_wan_qtypes(name, tensor)


def write_originals(folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    sd = original_state_dict()
    paths = {fmt: folder / name for fmt, name in ORIGINAL.items()}
    save_file(sd, str(paths["safetensors"]), metadata={"modelspec.title": "tiny wan2.1 t2v"})
    write_wan_gguf(paths["gguf"], sd, gguf_qtype, metadata={"general.name": "tiny wan2.1 t2v"})
    return paths


# --------------------------------------------------------------------------------------------
# Damage (deterministic from the case's seed)
# --------------------------------------------------------------------------------------------


def _flip_bits(data: bytes, rng: random.Random, start: int, end: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        pos = rng.randrange(start, max(start + 1, min(end, len(out))))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _lying_int(rng: random.Random, true: int, size: int) -> int:
    return rng.choice(
        [
            2**64 - 1,
            2**63,
            2**40,
            rng.randrange(2**64),
            size,
            size * 4,
            true + 1,
            max(0, true - 1),
            true * 2,
            true + rng.randrange(1, 4096),
            0,
        ]
    )


# Safetensors ---------------------------------------------------------------------------------


def _st_split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _st_join(header: dict | str | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    raw = raw.encode() if isinstance(raw, str) else raw
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def _st_tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def st_truncate(data, rng, path):
    return data[: rng.randrange(len(data))]


def st_flip_header(data, rng, path):
    n = int.from_bytes(data[:8], "little")
    return _flip_bits(data, rng, 0, 8 + n, rng.choice([1, 1, 2, 3, 8]))


def st_header_length(data, rng, path):
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.2:
        # A sparse file whose header length claims most of it: the length fits the size, the header is zeros.
        big = rng.choice([50, 90, 150]) * 2**20
        with open(path, "wb") as f:
            f.write((big - 16).to_bytes(8, "little") + data[8:])
            f.truncate(big)
        return None
    return _lying_int(rng, n, len(data)).to_bytes(8, "little") + data[8:]


def st_metadata(data, rng, path):
    header, body = _st_split(data)
    header["__metadata__"] = rng.choice(
        [
            ["a", "b"],
            {"modelspec.title": ["wan", 2]},
            {"modelspec.title": {"nested": {"deeper": 1}}},
            "just a string",
            7,
            None,
            {"modelspec.title": 1e300},
            # ComfyUI 0.33 parses this one as JSON itself (mixed-precision quantization).
            {"_quantization_metadata": "[" * 100000 + "]" * 100000},
            {"_quantization_metadata": "[1, 2]"},
            {"_quantization_metadata": '{"layers": {"blocks.0.ffn.0": 1e999}}'},
            {"_quantization_metadata": "not json"},
        ]
    )
    return _st_join(header, body)


def st_nested_json(data, rng, path):
    header, body = _st_split(data)
    depth = rng.choice([200, 5000, 100000])
    where = rng.choice(["metadata", "tensor", "top"])
    raw = json.dumps(header)
    nest = "[" * depth + "]" * depth
    if where == "top":
        raw = raw[:-1] + f', "zzz": {nest}}}'
    elif where == "metadata":
        raw = raw.replace('"__metadata__": {', f'"__metadata__": {{"deep": {nest}, ', 1)
    else:
        name = rng.choice(_st_tensors(header))
        raw = raw.replace(f'"{name}": {{', f'"{name}": {{"deep": {nest}, ', 1)
    return _st_join(raw, body)


def st_huge_json(data, rng, path):
    header, body = _st_split(data)
    meta = dict(header.get("__metadata__", {}))
    if rng.random() < 0.5:
        meta["notes"] = "x" * rng.choice([2**20, 4 * 2**20])
    else:
        meta.update({f"key{i}": str(i) for i in range(rng.choice([1000, 50000]))})
    header["__metadata__"] = meta
    return _st_join(header, body)


def st_offsets(data, rng, path):
    header, body = _st_split(data)
    name = rng.choice(_st_tensors(header))
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = rng.choice(
        [
            [start, len(body) + rng.randrange(1, 2**20)],
            [start, 2**63],
            [len(body) + 8, len(body) + 8 + (end - start)],
            [start + 4, end + 4],
            [end, start],
            [-1, end],
            [start, 1e999],
            [start],
        ]
    )
    return _st_join(json.dumps(header).replace("Infinity", "1e999"), body)


def st_shape(data, rng, path):
    header, body = _st_split(data)
    name = rng.choice(_st_tensors(header))
    shape = list(header[name]["shape"])
    choices = [
        [2**40] * max(1, len(shape)),
        [*shape[:-1], 0],
        [-1, *shape[1:]],
        [1e999] + shape[1:],
        [],
        [2**63, 2**63],
    ]
    if len(shape) >= 2:
        choices.append(list(reversed(shape)))  # same bytes, wrong layout
        choices.append([shape[0] * shape[1], *shape[2:]])  # flattened: same bytes
    else:
        choices.append([1, *shape])
    header[name]["shape"] = rng.choice(choices)
    return _st_join(json.dumps(header).replace("Infinity", "1e999"), body)


def st_dtype(data, rng, path):
    import torch
    from safetensors.torch import load, save

    sd = load(data)
    name = rng.choice(sorted(sd))
    sd[name] = rng.choice(
        [
            lambda t: t.to(torch.int32),
            lambda t: t.view(torch.int32),
            lambda t: t.to(torch.bool),
            lambda t: t.to(torch.uint8),
            lambda t: t.to(torch.float64),
            lambda t: t.to(torch.int64),
            lambda t: t.to(torch.complex64),
        ]
    )(sd[name])
    return save(sd)


def st_rename(data, rng, path):
    header, body = _st_split(data)
    name = rng.choice(_st_tensors(header))
    new = rng.choice(
        [name + "x", name.replace(".", "_", 1), "model." + name, name.replace("weight", "wieght")]
    )
    raw = json.dumps(header).replace(f'"{name}"', f'"{new}"', 1)
    return _st_join(raw, body)


def st_drop(data, rng, path):
    from safetensors.torch import load, save

    sd = load(data)
    for name in rng.sample(sorted(sd), rng.choice([1, 1, 2, 5])):
        del sd[name]
    return save(sd)


def st_extra(data, rng, path):
    import torch
    from safetensors.torch import load, save

    sd = load(data)
    sd[rng.choice(["blocks.0.extra.weight", "unused_lora.alpha", "model.something"])] = torch.zeros(3)
    return save(sd, metadata={"modelspec.title": "tiny wan2.1 t2v"})


def st_not_wan(data, rng, path):
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(rng.randrange(2**31))
    kind = rng.choice(["sd15", "random", "empty", "head_only", "flux"])
    if kind == "sd15":
        sd = {
            "input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
            "time_embed.0.weight": torch.zeros(4),
        }
    elif kind == "random":
        sd = {f"t{i}": torch.randn(rng.randrange(1, 9), generator=g) for i in range(rng.randrange(1, 20))}
    elif kind == "empty":
        sd = {}
    elif kind == "head_only":
        sd = {"head.modulation": torch.zeros(1, 2, 128), "head.head.weight": torch.zeros(64, 128)}
    else:
        sd = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4), "img_in.weight": torch.zeros(4, 4)}
    return save(sd)


# GGUF ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class GGUFLayout:
    """Byte positions in the undamaged GGUF file (found with gguf's reader, used to aim the damage)."""

    data_offset: int
    kv_count_pos: int
    tensor_count_pos: int
    kv_fields: list[dict]  # {"name", "key_len_pos", "type_pos", "value_pos", "array_len_pos"}
    tensor_fields: list[dict]  # {"name", "name_len_pos", "n_dims_pos", "dims_pos", "type_pos", "offset_pos"}


def gguf_layout(path: Path) -> GGUFLayout:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path, "r")
    base = reader.data.ctypes.data

    def pos(part: np.ndarray) -> int:
        return part.ctypes.data - base

    kv, tensors = [], []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        entry = {"name": name, "key_len_pos": pos(field.parts[0]), "type_pos": pos(field.parts[2])}
        entry["value_pos"] = pos(field.parts[3])
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            entry["array_len_pos"] = pos(field.parts[4])
        kv.append(entry)
    for t in reader.tensors:
        p = t.field.parts
        tensors.append(
            {
                "name": t.name,
                "name_len_pos": pos(p[0]),
                "n_dims_pos": pos(p[2]),
                "dims_pos": pos(p[3]),
                "n_dims": int(p[2][0]),
                "type_pos": pos(p[4]),
                "offset_pos": pos(p[5]),
                "type": int(t.tensor_type),
            }
        )
    return GGUFLayout(
        data_offset=reader.data_offset,
        tensor_count_pos=pos(reader.fields["GGUF.tensor_count"].parts[0]),
        kv_count_pos=pos(reader.fields["GGUF.kv_count"].parts[0]),
        kv_fields=kv,
        tensor_fields=tensors,
    )


def _put(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value % (1 << (8 * struct.calcsize(fmt))))
    return bytes(out)


def gg_truncate(data, rng, path, layout):
    if rng.random() < 0.5:
        return data[: rng.randrange(layout.data_offset + 1)]
    return data[: rng.randrange(len(data))]


def gg_flip_header(data, rng, path, layout):
    return _flip_bits(data, rng, 0, layout.data_offset, rng.choice([1, 1, 2, 3, 8]))


def gg_counts(data, rng, path, layout):
    if rng.random() < 0.5:
        return _put(
            data, layout.tensor_count_pos, "<Q", _lying_int(rng, len(layout.tensor_fields), len(data))
        )
    return _put(data, layout.kv_count_pos, "<Q", _lying_int(rng, len(layout.kv_fields) + 1, len(data)))


def gg_string_length(data, rng, path, layout):
    if rng.random() < 0.5:
        field = rng.choice(layout.kv_fields)
        return _put(data, field["key_len_pos"], "<Q", _lying_int(rng, len(field["name"]), len(data)))
    field = rng.choice(layout.tensor_fields)
    return _put(data, field["name_len_pos"], "<Q", _lying_int(rng, len(field["name"]), len(data)))


def gg_array_length(data, rng, path, layout):
    arrays = [f for f in layout.kv_fields if "array_len_pos" in f]
    field = rng.choice(arrays)
    return _put(data, field["array_len_pos"], "<Q", _lying_int(rng, 5, len(data)))


def gg_value_type(data, rng, path, layout):
    field = rng.choice(layout.kv_fields)
    return _put(data, field["type_pos"], "<I", rng.choice([9, 8, 0, 4, 10, 12, 13, 99, 2**31]))


def gg_tensor_info(data, rng, path, layout):
    field = rng.choice(layout.tensor_fields)
    what = rng.choice(["n_dims", "dims", "dims", "type", "offset", "offset"])
    if what == "n_dims":
        return _put(
            data, field["n_dims_pos"], "<I", rng.choice([0, 5, 8, 2**20, 2**32 - 1, field["n_dims"] + 1])
        )
    if what == "dims":
        dim = rng.randrange(field["n_dims"])
        return _put(
            data, field["dims_pos"] + 8 * dim, "<Q", rng.choice([2**20, 2**32, 2**62, 2**64 - 1, 0, 3])
        )
    if what == "type":
        # F16 <-> BF16 keeps every byte count: a reinterpretation of the values, which (like a flipped bit
        # in the data) no check without checksums can see. Every other change is damage to the layout.
        same_size = {1: 30, 30: 1}.get(field["type"])
        types = [t for t in (0, 1, 2, 3, 6, 7, 8, 12, 24, 26, 28, 30, 41, 1000) if t != same_size]
        return _put(data, field["type_pos"], "<I", rng.choice(types))
    size = len(data) - layout.data_offset
    return _put(
        data,
        field["offset_pos"],
        "<Q",
        rng.choice([size, size + 4096, 2**40, 2**64 - 32, 1, 32, 16, rng.randrange(size)]),
    )


def _gguf_rewrite(rng, edit, *, arch="wan", metadata=None):
    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    sd = original_state_dict()
    edit(sd)
    out = Path(tempfile.mkdtemp()) / "x.gguf"
    try:
        meta = {"general.name": "tiny wan2.1 t2v", **(metadata or {})}
        write_wan_gguf(out, sd, gguf_qtype, arch=arch, metadata=meta)
        return out.read_bytes()
    finally:
        shutil.rmtree(out.parent)


def gg_rename(data, rng, path, layout):
    def edit(sd):
        name = rng.choice(sorted(sd))
        sd[rng.choice([name + "x", "model." + name, name.replace("weight", "wieght"), name + ".0"])] = sd.pop(
            name
        )

    return _gguf_rewrite(rng, edit)


def gg_drop(data, rng, path, layout):
    def edit(sd):
        for name in rng.sample(sorted(sd), rng.choice([1, 1, 2, 5])):
            del sd[name]

    return _gguf_rewrite(rng, edit)


def gg_misshapen(data, rng, path, layout):
    def edit(sd):
        name = rng.choice(sorted(sd))
        t = sd[name]
        if t.dim() >= 2 and t.shape[0] != t.shape[1] and rng.random() < 0.5:
            # (A square weight transposed keeps its shape: that is damage to the values, which no check
            # without checksums can see, like a flipped bit in the data.)
            sd[name] = t.transpose(0, 1).contiguous()
        elif t.dim() >= 2:
            sd[name] = t.flatten(1)[:, : max(32, t[0].numel() // 2)].contiguous()
        else:
            sd[name] = t.repeat(2)

    return _gguf_rewrite(rng, edit)


def gg_dtype(data, rng, path, layout):
    if rng.random() < 0.5:
        # A tensor stored as F64 (a type the loader does not decode), written by gguf's own writer.
        import torch

        def edit(sd):
            name = rng.choice(sorted(n for n in sd if sd[n].dim() <= 4))
            sd[name] = sd[name].to(torch.float64)

        sd = original_state_dict()
        edit(sd)
        out = Path(tempfile.mkdtemp()) / "x.gguf"
        try:
            import gguf

            writer = gguf.GGUFWriter(str(out), "wan")
            for k, v in sd.items():
                writer.add_tensor(k, v.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return out.read_bytes()
        finally:
            shutil.rmtree(out.parent)
    # An integer type (I32) on a float tensor.
    field = rng.choice(
        [f for f in layout.tensor_fields if "modulation" in f["name"] or "patch_embedding" in f["name"]]
    )
    return _put(data, field["type_pos"], "<I", int(gguf_types().I32))


def gguf_types():
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType


def gg_metadata(data, rng, path, layout):
    kind = rng.choice(["arch", "big_string", "big_array", "alignment", "orig_shape"])
    if kind == "arch":
        return _gguf_rewrite(rng, lambda sd: None, arch=rng.choice(["llama", "flux", "", "wan2"]))
    if kind == "big_string":
        return _gguf_rewrite(rng, lambda sd: None, metadata={"general.description": "x" * 2**20})
    if kind == "big_array":
        return _gguf_rewrite(
            rng, lambda sd: None, metadata={"general.tags": list(range(rng.choice([10, 70000])))}
        )
    if kind == "orig_shape":
        return _gguf_rewrite(
            rng, lambda sd: None, metadata={"comfy.gguf.orig_shape.blocks.0.ffn.0.weight": [2**30, 2**30]}
        )
    # The key written, then its value replaced: key, u32 value type, u32 value.
    written = _gguf_rewrite(rng, lambda sd: None, metadata={"general.alignment": 32})
    key = b"general.alignment"
    value_pos = written.index(key) + len(key) + 4
    return _put(written, value_pos, "<I", rng.choice([0, 3, 16, 64, 2**31]))


def gg_not_wan(data, rng, path, layout):
    import torch

    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    out = Path(tempfile.mkdtemp()) / "x.gguf"
    try:
        kind = rng.choice(["random", "empty", "head_only"])
        if kind == "random":
            sd = {f"t{i}": torch.randn(32) for i in range(rng.randrange(1, 10))}
        elif kind == "empty":
            sd = {}
        else:
            sd = {"head.modulation": torch.zeros(1, 2, 128), "head.head.weight": torch.zeros(64, 128)}
        write_wan_gguf(out, sd, gguf_qtype)
        return out.read_bytes()
    finally:
        shutil.rmtree(out.parent)


DAMAGE = {
    "safetensors": {
        "truncate": st_truncate,
        "flip_header": st_flip_header,
        "header_length": st_header_length,
        "metadata": st_metadata,
        "nested_json": st_nested_json,
        "huge_json": st_huge_json,
        "offsets": st_offsets,
        "shape": st_shape,
        "dtype": st_dtype,
        "rename": st_rename,
        "drop": st_drop,
        "extra": st_extra,
        "not_wan": st_not_wan,
    },
    "gguf": {
        "truncate": gg_truncate,
        "flip_header": gg_flip_header,
        "counts": gg_counts,
        "string_length": gg_string_length,
        "array_length": gg_array_length,
        "value_type": gg_value_type,
        "tensor_info": gg_tensor_info,
        "rename": gg_rename,
        "drop": gg_drop,
        "misshapen": gg_misshapen,
        "dtype": gg_dtype,
        "metadata": gg_metadata,
        "not_wan": gg_not_wan,
    },
}


def plan_cases(seed: int, cases_per_format: int, formats=FORMATS) -> list[dict]:
    """(format, kind, seed) for every case: kinds in turn, so every kind gets its share."""
    rng = random.Random(seed)
    out = []
    for fmt in formats:
        kinds = sorted(DAMAGE[fmt])
        for i in range(cases_per_format):
            out.append(
                {
                    "id": f"{fmt}-{i}",
                    "format": fmt,
                    "kind": kinds[i % len(kinds)],
                    "seed": rng.randrange(2**32),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# The worker (ComfyUI imported once; one case after another)
# --------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _weights(patcher) -> dict:
    """Name -> comparable value of a loaded model's diffusion-model weights (GGUF ones as raw bytes)."""
    import torch

    out = {}
    for name, value in patcher.model.diffusion_model.state_dict().items():
        if hasattr(value, "tensor_type"):
            out[name] = (
                int(value.tensor_type),
                tuple(value.tensor_shape),
                value.as_subclass(torch.Tensor).clone(),
            )
        else:
            out[name] = (str(value.dtype), tuple(value.shape), value.clone())
    return out


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


def worker_main(comfyui: str, folder: str, cap_slack_mib: int) -> None:
    sys.path.insert(0, comfyui)
    import logging

    logging.disable(logging.CRITICAL)  # the parent reads only our JSON lines
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import folder_paths
    import torch

    torch.set_num_threads(1)
    _load_pack()
    from wan22_blockswap import loader

    folder_paths.folder_names_and_paths["diffusion_models"] = ([folder], {".safetensors", ".sft"})
    folder_paths.folder_names_and_paths.pop(loader.GGUF_FOLDER, None)
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.clear()  # the listing of the folder we just set

    def load(fmt: str, name: str):
        st, gg = (name, loader.NO_MODEL) if fmt == "safetensors" else (loader.NO_MODEL, name)
        return loader.load_wan_model(fmt, st, gg)

    references = {}
    sizes = {}
    for fmt, name in ORIGINAL.items():
        references[fmt] = _weights(load(fmt, name))
        sizes[fmt] = os.path.getsize(os.path.join(folder, name))
    mm.unload_all_models()
    # The cap: what start-up mapped, plus room for a model of the largest file twice over.
    mapped = _status_bytes("VmSize")
    cap = mapped + 2 * max(sizes.values()) + cap_slack_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps({"ready": True}), flush=True)

    originals = {fmt: Path(folder, name).read_bytes() for fmt, name in ORIGINAL.items()}
    layout = gguf_layout(Path(folder, ORIGINAL["gguf"]))
    for line in sys.stdin:
        case = json.loads(line)
        fmt, name = case["format"], f"case_{case['id']}.{case['format']}"
        path = os.path.join(folder, name)
        rng = random.Random(case["seed"])
        original = originals[fmt]
        try:
            if fmt == "gguf":
                damaged = DAMAGE[fmt][case["kind"]](original, rng, path, layout)
            else:
                damaged = DAMAGE[fmt][case["kind"]](original, rng, path)
        except Exception as exc:  # a bug in the damage, not in the loader: reported as such
            print(
                json.dumps({"id": case["id"], "outcome": "harness", "message": repr(exc)[:300]}), flush=True
            )
            continue
        if damaged is not None:
            Path(path).write_bytes(damaged)
        size = os.path.getsize(path)
        result = {"id": case["id"], "format": fmt, "kind": case["kind"], "size": size}
        rss_before = _status_bytes("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        try:
            patcher = load(fmt, name)
        except ValueError as exc:
            message = str(exc)
            result["outcome"] = "refused" if name in message else "unnamed"
            result["message"] = message[:300]
        except MemoryError as exc:
            result["outcome"] = "memory"
            result["message"] = f"MemoryError: {exc}"[:300]
        except BaseException as exc:  # noqa: BLE001 - every other exception is what the run looks for
            result["outcome"] = "crash"
            result["message"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            same = _equal(_weights(patcher), references[fmt])
            result["outcome"] = "accepted" if same else "different"
            del patcher
        result["seconds"] = round(time.perf_counter() - started, 4)
        growth = _status_bytes("VmHWM") - rss_before
        result["peak_growth"] = growth
        if result["outcome"] in ("refused", "accepted") and growth > 2 * size + case["rss_slack"]:
            result["outcome"] = "memory"
        mm.unload_all_models()
        os.unlink(path)
        print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, comfyui: str, folder: str, cap_slack_mib: int, startup_timeout: float):
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("WAN22_COMFYUI", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--comfyui",
                comfyui,
                "--folder",
                folder,
                "--cap-slack-mib",
                str(cap_slack_mib),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        ready = self.read(startup_timeout)
        if not ready or not ready.get("ready"):
            self.kill()
            raise RuntimeError("the fuzz worker did not start (ComfyUI import or the reference load failed)")

    def read(self, timeout: float) -> dict | None:
        if not self.selector.select(timeout):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.selector.close()


def run_cases(
    cases: list[dict],
    comfyui: str,
    workers: int = 2,
    timeout: float = 20.0,
    rss_slack_mib: int = 64,
    cap_slack_mib: int = 1024,
) -> list[dict]:
    """Run the cases on `workers` worker processes; one result per case, in case order."""
    import threading

    folder = tempfile.mkdtemp(prefix="wan22_damaged_")
    try:
        _write_originals_in_child(folder)
        chunks = [cases[i::workers] for i in range(workers)]
        results: dict[str, dict] = {}

        def drive(chunk: list[dict]) -> None:
            pending = list(chunk)
            while pending:
                worker = Worker(comfyui, folder, cap_slack_mib, startup_timeout=300)
                try:
                    while pending:
                        case = pending[0]
                        worker.proc.stdin.write(
                            json.dumps({**case, "rss_slack": rss_slack_mib * 2**20}) + "\n"
                        )
                        worker.proc.stdin.flush()
                        result = worker.read(timeout)
                        if result is None:
                            alive = worker.proc.poll() is None
                            outcome = "hang" if alive else "died"
                            results[case["id"]] = {
                                **case,
                                "outcome": outcome,
                                "message": f"rc {worker.proc.poll()}",
                            }
                            pending.pop(0)
                            break
                        results[case["id"]] = {**case, **result}
                        pending.pop(0)
                finally:
                    worker.kill()

        threads = [threading.Thread(target=drive, args=(c,)) for c in chunks if c]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results[c["id"]] for c in cases]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_originals_in_child(folder: str) -> None:
    """The undamaged files, written by a child (the parent needs neither torch nor ComfyUI)."""
    subprocess.run([sys.executable, __file__, "--write-originals", folder], check=True, cwd=str(ROOT))


def _load_pack() -> None:
    sys.path.insert(0, str(ROOT))
    import test_performance

    test_performance.load_package()


def summarize(results: list[dict]) -> dict:
    out = {}
    for fmt in FORMATS:
        rows = [r for r in results if r["format"] == fmt]
        if not rows:
            continue
        out[fmt] = {
            "cases": len(rows),
            "outcomes": dict(collections.Counter(r["outcome"] for r in rows)),
            "by_kind": {
                kind: dict(collections.Counter(r["outcome"] for r in rows if r["kind"] == kind))
                for kind in sorted({r["kind"] for r in rows})
            },
            "max_case_seconds": max(r.get("seconds", 0) for r in rows),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--comfyui", default=os.environ.get("WAN22_COMFYUI", str(Path.home() / "comfy-hosts" / "0.33"))
    )
    parser.add_argument("--cases", type=int, default=2000, help="cases per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    parser.add_argument("--rss-slack-mib", type=int, default=64)
    parser.add_argument("--cap-slack-mib", type=int, default=1024)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--write-originals", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_originals:
        _load_pack()
        write_originals(Path(args.write_originals))
        return 0
    if args.worker:
        worker_main(args.comfyui, args.folder, args.cap_slack_mib)
        return 0
    started = time.perf_counter()
    cases = plan_cases(args.seed, args.cases, tuple(args.formats.split(",")))
    results = run_cases(
        cases, args.comfyui, args.workers, args.timeout, args.rss_slack_mib, args.cap_slack_mib
    )
    summary = summarize(results)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["comfyui"] = args.comfyui
    print(json.dumps(summary, indent=1))
    for r in results:
        if r["outcome"] in FAILURES:
            print(f"{r['id']} {r['kind']} {r['outcome']}: {r.get('message', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["outcome"] in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

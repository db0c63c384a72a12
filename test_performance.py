#!/usr/bin/env python3
"""Measure what block swapping costs and saves on this machine.

    python test_performance.py                       # synthetic WAN model, built-in defaults
    python test_performance.py --preset 14b --blocks-to-swap 40 --prefetch 1 --non-blocking
    python test_performance.py --model-path /path/to/wan.safetensors --test-all
    python test_performance.py --comfyui ~/ComfyUI --model-path model.gguf --vram-limit 12 --chart c.png

Each configuration runs the same forward passes ("steps") as a model with every block resident and
reports VRAM, RAM, step time, bytes moved per step, copy bandwidth and how long compute waited for
copies. Results go to a JSON file (default block_swap_performance_results.json).

With ComfyUI importable (this pack in ComfyUI/custom_nodes/, or --comfyui PATH), --model-path loads
the file through the pack's WAN Model Loader path (safetensors, fp8, fp8_scaled, GGUF) and times
ComfyUI's own WanModel with BlockSwap, against ComfyUI's own offloading (bench/comfy_bench.py), and
ends with a recommendation line quoting a measured row.

Without ComfyUI the model is a WAN-shaped transformer in plain torch (bench/synthetic_model.py): the
real block architecture and parameter shapes with random weights, or the weights of a WAN .safetensors
file. It runs the same work per block as WAN, so memory and timing behave like the real model; its
outputs are not WAN's (no RoPE, simplified time embedding).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PACKAGE = "wan22_blockswap"
DEFAULT_OUTPUT = "block_swap_performance_results.json"
ORIGINAL_ROW_KEYS = (
    "model_path",
    "blocks_to_swap",
    "gpu_savings_mb",
    "gpu_savings_percent",
    "cpu_increase_mb",
    "cpu_increase_percent",
    "time_difference_s",
    "time_difference_percent",
    "memory_no_swap",
    "memory_with_swap",
)
NO_GPU = "n/a (no GPU)"


def load_package():
    """Import this repository as the package `wan22_blockswap` (its modules use relative imports)."""
    if PACKAGE in sys.modules and hasattr(sys.modules[PACKAGE], "bench"):
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    for name in (
        "utils",
        "block_manager",
        "wan.units",
        "wan.detect",
        "bench.synthetic_model",
        "bench.report",
        "bench.file_backed",
    ):
        importlib.import_module(f"{PACKAGE}.{name}")
    return module


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of GB such as 12 (got {text!r})") from e
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (got {text!r})") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1 (got {text!r})")
    return values


def _resolution(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 832x480 (got {text!r})") from e
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"width and height must be >= 16 (got {text!r})")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_performance.py",
        description="Benchmark WAN block swapping: VRAM saved, RAM used, step time, copy bandwidth.",
    )
    p.add_argument(
        "--model-path",
        help="a WAN .safetensors or .gguf file (GGUF and ComfyUI's WanModel need ComfyUI: see --comfyui; "
        "default: random weights of --preset)",
    )
    p.add_argument(
        "--preset",
        choices=["1.3b", "5b", "14b", "small", "tiny"],
        default=None,
        help="block shapes of the synthetic model (default: 1.3b on a GPU, small on CPU)",
    )
    p.add_argument("--layers", type=_positive_int, help="use this many blocks instead of the preset's")
    p.add_argument(
        "--blocks-to-swap",
        type=_non_negative_int,
        default=None,
        help="blocks kept in CPU RAM (default: 20, or every block with --test-all off and fewer)",
    )
    p.add_argument("--test-all", action="store_true", help="sweep blocks_to_swap over 0..all blocks")
    p.add_argument(
        "--auto",
        action="store_true",
        help="with --model-path: also auto_blocks_to_swap, loaded per video as ComfyUI's sampler loads it, "
        "compared with the best fixed blocks_to_swap measured",
    )
    p.add_argument(
        "--prefetch",
        type=_non_negative_int,
        nargs="+",
        default=None,
        help="prefetch_blocks value(s) to measure (default: 1 on a GPU, 0 on CPU)",
    )
    p.add_argument(
        "--non-blocking",
        action="store_true",
        help="pinned RAM + asynchronous copies (on by default on a GPU when --prefetch is not given)",
    )
    p.add_argument(
        "--placement",
        choices=["tail", "spread"],
        default="tail",
        help="which blocks to swap: the last ones, or spread among resident ones",
    )
    p.add_argument("--tokens", type=_int_list, help="tokens per step, comma-separated for several points")
    p.add_argument("--resolution", type=_resolution, help="video size WIDTHxHEIGHT (with --frames)")
    p.add_argument("--frames", type=_positive_int, default=81, help="video frames (with --resolution)")
    p.add_argument("--steps", type=_positive_int, default=3, help="timed forward passes per configuration")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="weights (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON results file (default {DEFAULT_OUTPUT})")
    p.add_argument("--json-only", action="store_true", help="print only the JSON document")
    p.add_argument(
        "--compare-native",
        action="store_true",
        help="also run ComfyUI's own offloading at the same VRAM budget (needs ComfyUI importable)",
    )
    p.add_argument(
        "--comfyui",
        "--comfyui-path",
        dest="comfyui_path",
        default=None,
        help="ComfyUI folder to import (default: the ComfyUI this pack sits in, if any; for --compare-native "
        "also the first entry of $COMFYUI_PATH)",
    )
    p.add_argument(
        "--comfyui-gguf",
        default=None,
        help="ComfyUI-GGUF folder, for its loader and offloading as a contender on GGUF files "
        "(default: $COMFYUI_GGUF_PATH or custom_nodes/ComfyUI-GGUF)",
    )
    p.add_argument(
        "--fp8-optimization",
        choices=["disabled", "e4m3fn", "e5m2"],
        default="disabled",
        help="the WAN Model Loader's fp8_optimization for a safetensors --model-path (weights stored in fp8)",
    )
    p.add_argument(
        "--vram-limit",
        type=_positive_float,
        metavar="GB",
        help="simulate a card with this much VRAM: occupy the rest of the GPU before any contender loads "
        "(needs a GPU and --model-path inside ComfyUI)",
    )
    p.add_argument(
        "--host-tiers",
        action="store_true",
        help="measure each swapped row per host tier: pinned slabs (GPU only), pageable slabs, the file tier "
        "with a warm page cache and with a cold one (dropped before each step); the blocks are first written "
        "to a file next to --output and memory-mapped, as a GGUF loader leaves them",
    )
    p.add_argument("--chart", metavar="PATH.png", help="also draw step time and peak VRAM vs blocks_to_swap")
    return p


@dataclasses.dataclass
class Workload:
    model_path: str | None
    preset: str
    variant: str
    layers: int
    dtype: torch.dtype
    device: torch.device
    tokens: list[int]
    text_tokens: int
    steps: int


def tokens_for_video(preset: str, width: int, height: int, frames: int) -> int:
    # WAN VAEs compress 4x in time; 8x in space (16x for the 5B's 2.2 VAE); patches are 1x2x2.
    spatial = 32 if preset == "5b" else 16
    return ((frames - 1) // 4 + 1) * (height // spatial) * (width // spatial)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def load_model(workload: Workload, pkg):
    sm = pkg.bench.synthetic_model
    if workload.model_path is None:
        return sm.build_model(
            workload.preset,
            workload.variant,
            num_layers=workload.layers,
            dtype=workload.dtype,
            device="cpu",
            init_device=workload.device if workload.device.type == "cuda" else "cpu",
        )
    return load_safetensors_model(Path(workload.model_path), workload, pkg)


def shape_from_state_dict(keys_and_shapes: dict[str, tuple[int, ...]], pkg):
    """WAN block shapes from ComfyUI-named weights, via the loader's own detection (wan_detect)."""
    try:
        detection = pkg.wan.detect.detect_wan(keys_and_shapes)
        ffn = keys_and_shapes["blocks.0.ffn.0.weight"][0]
        text_dim = keys_and_shapes["text_embedding.0.weight"][1]
    except (ValueError, KeyError) as e:
        raise SystemExit(f"--model-path: not a WAN diffusion model in ComfyUI's key format ({e})") from e
    if detection.variant not in ("t2v", "i2v", "vace"):
        raise SystemExit(
            f"--model-path: {detection.describe()}; this benchmark's model covers t2v, i2v and VACE files"
        )
    shape = pkg.bench.synthetic_model.WanShape(
        dim=detection.dim,
        ffn_dim=ffn,
        num_heads=max(1, detection.dim // 128),  # head dim is 128 in every released WAN
        num_layers=detection.num_layers,
        in_dim=detection.in_dim,
        out_dim=detection.out_dim,
        text_dim=text_dim,
    )
    return shape, detection.variant


def load_safetensors_model(path: Path, workload: Workload, pkg):
    if not path.is_file():
        raise SystemExit(f"--model-path: no such file: {path}")
    if path.suffix.lower() == ".gguf":
        raise SystemExit(
            "--model-path: GGUF files run through ComfyUI's WanModel with the pack's GGUF layers, so they need "
            "ComfyUI: pass --comfyui PATH (or run this script from ComfyUI/custom_nodes/)"
        )
    from safetensors import safe_open

    sm = pkg.bench.synthetic_model
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        shape, variant = shape_from_state_dict(shapes, pkg)
        workload.variant, workload.layers = variant, shape.num_layers
        with torch.device("meta"):
            model = sm.SyntheticWanModel(shape, variant)
        model = model.to(workload.dtype).to_empty(device="cpu")
        own = model.state_dict(keep_vars=True)
        missing = [k for k in own if k not in shapes]
        if missing:
            raise SystemExit(f"--model-path: the file lacks {len(missing)} WAN weights, e.g. {missing[:3]}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(f.get_tensor(key).to(workload.dtype).view(target.shape))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_pinned_copy_gbps(device: torch.device, nbytes: int, repeats: int = 5) -> float | None:
    """Host-to-device bandwidth of a plain pinned copy of `nbytes`, the ceiling for swapping."""
    if device.type != "cuda" or nbytes == 0:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return nbytes * repeats / seconds / 1e9


def memory_snapshot(device: torch.device, pkg) -> dict[str, object]:
    utils = pkg.utils
    snap: dict[str, object] = {
        "cpu_rss_mb": utils.mib(utils.process_rss()),
        "cpu_anon_rss_mb": utils.mib(utils.process_anon_rss()),
    }
    if device.type == "cuda":
        for key, value in utils.cuda_memory(device).items():
            snap[f"gpu_{key}_mb"] = utils.mib(value)
    else:
        for key in ("allocated", "reserved", "peak_allocated", "peak_reserved"):
            snap[f"gpu_{key}_mb"] = NO_GPU
    return snap


class Progress:
    """One-line progress bar on stderr (silent with --json-only or when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<40}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def place_non_units(model, device: torch.device, unit_names: set[str]) -> None:
    """Modules outside the swap units (time embedding, head, ...) always live on the compute device."""
    for name, child in model.named_children():
        if name not in unit_names:
            child.to(device)


def run_config(
    model,
    workload: Workload,
    tokens: int,
    blocks_to_swap: int,
    prefetch: int,
    non_blocking: bool,
    placement: str,
    pkg,
    progress: Progress,
    tier: str | None = None,
    files=None,
) -> dict[str, object]:
    """One row. tier (--host-tiers): "pinned" / "pageable" slabs, "file" or "file-cold" (the blocks are
    views of `files`, a FileBackedBlocks; cold drops its page cache before each timed step)."""
    bm, wu, sm, utils = pkg.block_manager, pkg.wan.units, pkg.bench.synthetic_model, pkg.utils
    device = workload.device
    if tier is not None and tier.startswith("file"):
        files.bind()
    if tier in ("pinned", "pageable"):
        non_blocking = tier == "pinned"
    choice = wu.select_wan_units(model, blocks_to_swap, placement=placement)
    engine = bm.BlockSwapEngine(
        choice.units,
        choice.swap,
        device,
        prefetch_blocks=prefetch,
        use_non_blocking=non_blocking,
        debug=device.type == "cuda",
        host_memory="file" if tier is not None and tier.startswith("file") else "ram",
    )
    inputs = sm.example_inputs(model, tokens=tokens, text_tokens=workload.text_tokens)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    engine.attach()  # first attach builds (and pins) the host slabs and loads resident blocks
    sync(device)
    load_time = time.perf_counter() - start
    try:
        with torch.inference_mode():
            model(**inputs)  # warm-up: kernels, allocator
        engine.detach()
        sync(device)
        # The timed run is a second attach, as every later sampling run is: slabs already exist.
        engine.counters.reset()
        engine.attach()
        steady = memory_snapshot(device, pkg)
        times = []
        with torch.inference_mode():
            for _ in range(workload.steps):
                if tier == "file-cold":
                    files.drop_page_cache()
                t0 = time.perf_counter()
                model(**inputs)
                sync(device)
                times.append(time.perf_counter() - t0)
        after = memory_snapshot(device, pkg)
        counters = dataclasses.replace(engine.counters)
        pinned = engine.pinned_bytes()
        tiers = engine.host.tier_summary(engine.swapped_units)
        engine.detach()
    finally:
        engine.release()
    stats = engine.last_run
    steps = workload.steps
    step_time = statistics.median(times)
    moved = counters.bytes_copied / steps
    progress.step(f"tokens={tokens} swap={blocks_to_swap} prefetch={prefetch}")
    peak = memory_snapshot(device, pkg)["gpu_peak_allocated_mb"]
    row = {
        "mode": "blockswap",
        "contender": "blockswap" if blocks_to_swap else "resident",
        "video": f"{tokens} tokens",
        "tokens": tokens,
        "blocks_to_swap": blocks_to_swap,
        "prefetch_blocks": prefetch,
        "non_blocking": non_blocking,
        "tier": tier or ("-" if not blocks_to_swap else "pinned" if pinned else "pageable"),
        "host_tiers": {k: utils.mib(v) if k.endswith("bytes") else v for k, v in tiers.items()},
        "placement": placement,
        "load_time_s": round(load_time, 3),
        "step_time_s": round(step_time, 4),
        "step_times_s": [round(t, 4) for t in times],
        "bytes_moved_per_step": int(moved),
        "h2d_effective_gbps": round(moved / step_time / 1e9, 2) if moved else 0.0,
        "copy_gbps": None,
        "stall_ms_per_step": None,
        "pinned_mb": utils.mib(pinned),
        "slot_mb": utils.mib(engine.slot_bytes()) if blocks_to_swap else 0.0,
        "resident_weights_mb": utils.mib(engine.resident_bytes()),
        "swapped_weights_mb": utils.mib(engine.swapped_bytes()),
        "on_demand_copies_per_step": counters.misses / steps,
        # Blocks left in their file, copied through the staging ring (GPU only), and how many of those
        # copies waited for the ring's reader.
        "staged_copies_per_step": counters.staged_units / steps,
        "staging_waits_per_step": counters.staging_waits / steps,
        "memory": {
            **{f"steady_{k}": v for k, v in steady.items() if "peak" not in k},
            **{k: v for k, v in after.items() if "peak" in k},
            "cpu_rss_mb": after["cpu_rss_mb"],
        },
    }
    row["peak_vram_mb"] = peak
    if stats is not None and stats.copy_ms and device.type == "cuda":
        row["copy_gbps"] = round(stats.copy_gbps(counters.bytes_copied) or 0.0, 2)
        row["stall_ms_per_step"] = round(stats.stall_ms / steps, 2)
    return row


def compare(row: dict[str, object], base: dict[str, object], model_path: str | None) -> dict[str, object]:
    """Fill the original tool's keys: savings and costs of this row relative to the no-swap row."""
    mem, base_mem = row["memory"], base["memory"]
    row["model_path"] = model_path
    if isinstance(mem.get("gpu_peak_allocated_mb"), (int, float)):
        saved = base_mem["gpu_peak_allocated_mb"] - mem["gpu_peak_allocated_mb"]
        row["gpu_savings_mb"] = round(saved, 1)
        row["gpu_savings_percent"] = round(100 * saved / base_mem["gpu_peak_allocated_mb"], 1)
    else:
        row["gpu_savings_mb"] = row["gpu_savings_percent"] = None
    extra = mem["cpu_rss_mb"] - base_mem["cpu_rss_mb"]
    row["cpu_increase_mb"] = round(extra, 1)
    row["cpu_increase_percent"] = round(100 * extra / base_mem["cpu_rss_mb"], 1)
    if mem.get("steady_cpu_anon_rss_mb") is not None and base_mem.get("steady_cpu_anon_rss_mb") is not None:
        row["ram_anon_increase_mb"] = round(
            mem["steady_cpu_anon_rss_mb"] - base_mem["steady_cpu_anon_rss_mb"], 1
        )
    row["time_difference_s"] = round(row["step_time_s"] - base["step_time_s"], 4)
    row["time_difference_percent"] = round(100 * (row["step_time_s"] / base["step_time_s"] - 1), 1)
    row["step_time_ratio"] = round(row["step_time_s"] / base["step_time_s"], 3)
    row["memory_no_swap"] = base_mem
    row["memory_with_swap"] = mem
    return row


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _cell(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if abs(value) < 100 else f"{value:,.0f}{unit}"
    return f"{value:,}{unit}"


def format_table(doc: dict[str, object]) -> str:
    columns = [
        ("tokens", "tokens", ""),
        ("blocks_to_swap", "swap", ""),
        ("prefetch_blocks", "pf", ""),
        ("tier", "host tier", ""),
        ("step_time_s", "step s", ""),
        ("step_time_ratio", "x base", ""),
        ("gpu_savings_mb", "VRAM saved MB", ""),
        ("cpu_increase_mb", "RAM +MB", ""),
        ("ram_anon_increase_mb", "anon +MB", ""),
        ("bytes_moved_per_step", "MB/step", ""),
        ("h2d_effective_gbps", "eff GB/s", ""),
        ("copy_gbps", "copy GB/s", ""),
        ("stall_ms_per_step", "stall ms", ""),
    ]
    rows = []
    for r in doc["results"]:
        cells = []
        for key, _, unit in columns:
            value = r.get(key)
            if key == "bytes_moved_per_step":
                value = load_package().utils.mib(value)
            if key == "gpu_savings_mb" and value is None and doc["machine"]["gpu"] is None:
                value = NO_GPU
            if r.get("mode") != "blockswap" and key == "prefetch_blocks":
                value = r["mode"]
            cells.append(_cell(value, unit))
        rows.append(cells)
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def summary_header(doc: dict[str, object]) -> str:
    m, w = doc["machine"], doc["workload"]
    where = (
        f"{m['gpu']} ({m['gpu_memory_gb']} GB, {m['pcie_link'] or 'PCIe link unknown'})"
        if m["gpu"]
        else "CPU only"
    )
    lines = [
        f"Machine: {where}; CPU {m['cpu']} x{m['cpu_cores']}, {m['ram_gb']} GB RAM; torch {m['torch']}",
        f"Model: {w['model_path'] or 'synthetic ' + w['preset']} {w['variant']}, {w['layers']} blocks, {w['dtype']}, "
        f"{w['steps']} timed steps per row, text tokens {w['text_tokens']}",
    ]
    if w.get("model_runner", "").startswith("synthetic"):
        lines.append(
            "Model runner: the plain-torch WAN look-alike (no ComfyUI imported; --comfyui PATH times "
            "ComfyUI's own WanModel on --model-path, against ComfyUI's own offloading)"
        )
    if doc["plain_pinned_copy_gbps"]:
        lines.append(
            f"Plain pinned host->device copy on this machine: {doc['plain_pinned_copy_gbps']:.1f} GB/s"
        )
    if doc["smoke_run"]:
        lines.append(
            "NOTE: no GPU - this is a smoke run of the machinery (host slabs copied into CPU slots), "
            "not a performance result. VRAM columns: " + NO_GPU
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def resolve_workload(args, parser) -> Workload:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    # On a CPU the default is a narrow model of 1.3B's depth: the whole path in seconds, not minutes.
    preset = args.preset or ("1.3b" if device.type == "cuda" else "small")
    dtype = load_package().utils.FLOAT_DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.tokens and args.resolution:
        parser.error("give either --tokens or --resolution/--frames, not both")
    if args.resolution:
        tokens = [tokens_for_video(preset, *args.resolution, args.frames)]
    else:
        tokens = args.tokens or ([32760, 1560] if device.type == "cuda" else [256])
    layers = args.layers or pkg_shapes()[preset].num_layers
    return Workload(args.model_path, preset, "t2v", layers, dtype, device, tokens, 512, args.steps)


def pkg_shapes():
    return load_package().bench.synthetic_model.PRESETS


def swap_counts(args, layers: int) -> list[int]:
    if args.test_all:
        step = max(1, layers // 4)
        return sorted({*range(step, layers, step), layers})
    count = args.blocks_to_swap if args.blocks_to_swap is not None else min(20, layers)
    if count > layers:
        raise SystemExit(f"--blocks-to-swap must be between 0 and {layers} for this model (got {count})")
    return [count]


def comfyui_folder(args) -> str | None:
    """The ComfyUI to import: --comfyui, else the one this pack is installed in (custom_nodes/)."""
    if args.comfyui_path:
        return args.comfyui_path
    if ROOT.parent.name == "custom_nodes" and (ROOT.parent.parent / "comfy" / "model_patcher.py").is_file():
        return str(ROOT.parent.parent)
    return None


def import_comfyui(folder: str | None, cpu: bool) -> str | None:
    """Import ComfyUI from `folder` (CPU mode without a GPU); None when it is importable, else why not."""
    if "comfy.model_management" in sys.modules:
        return None  # already imported by whoever runs us (ComfyUI itself, the host tests)
    if folder is None:
        return "no ComfyUI folder given"
    if not (Path(folder) / "comfy" / "model_patcher.py").is_file():
        return f"{folder} is not a ComfyUI folder (no comfy/model_patcher.py)"
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        import comfy.cli_args

        if cpu:
            comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError as e:
        return f"ComfyUI at {folder} is not importable ({e}); install its requirements into this Python"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    pkg = load_package()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.vram_limit is not None and not (on_gpu and torch.cuda.is_available()):
        parser.error(
            "--vram-limit simulates a smaller GPU on a larger one, and this machine has no CUDA GPU "
            "(ComfyUI's CPU mode has no VRAM to limit)"
        )
    if args.chart:
        missing = pkg.bench.report.matplotlib_missing()
        if missing:
            parser.error(missing)
    if args.model_path:
        folder = comfyui_folder(args)
        if folder is not None or "comfy.model_management" in sys.modules:
            problem = import_comfyui(folder, cpu=not on_gpu)
            if problem is None:
                return main_comfyui(args, parser, pkg)
            if args.comfyui_path:
                raise SystemExit(f"--comfyui: {problem}")
    if args.vram_limit is not None:
        parser.error("--vram-limit needs --model-path inside ComfyUI (--comfyui PATH)")
    workload = resolve_workload(args, parser)
    prefetches = (
        args.prefetch if args.prefetch is not None else ([1] if workload.device.type == "cuda" else [0])
    )
    non_blocking = args.non_blocking or workload.device.type == "cuda" and args.prefetch is None

    load_start = time.perf_counter()
    model = load_model(workload, pkg)
    model_load_s = time.perf_counter() - load_start
    counts = swap_counts(args, workload.layers)
    unit_names = {name.split(".")[0] for name, _ in pkg.wan.units.execution_order(model)}
    place_non_units(model, workload.device, unit_names)

    largest_block = max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in model.blocks)
    doc: dict[str, object] = {
        "tool": "test_performance.py",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke_run": workload.device.type != "cuda",
        "machine": pkg.utils.machine_info(),
        "workload": {
            "model_path": workload.model_path,
            "preset": workload.preset if workload.model_path is None else None,
            "variant": workload.variant,
            "layers": workload.layers,
            "dtype": str(workload.dtype).replace("torch.", ""),
            "device": str(workload.device),
            "tokens": workload.tokens,
            "text_tokens": workload.text_tokens,
            "steps": workload.steps,
            "model_build_s": round(model_load_s, 2),
            "load_time_s": round(model_load_s, 2),
            "model_runner": "synthetic plain-torch WAN (ComfyUI not imported)",
        },
        "plain_pinned_copy_gbps": None,
        "results": [],
    }
    gbps = plain_pinned_copy_gbps(workload.device, largest_block)
    doc["plain_pinned_copy_gbps"] = round(gbps, 2) if gbps else None
    # --host-tiers: the file tier first, while the blocks are still the file's views (a slab row leaves them
    # in its slab); each file row binds them to the file again.
    tiers = [None]
    files = None
    if args.host_tiers:
        tiers = ["file", "file-cold", "pageable"] + (["pinned"] if workload.device.type == "cuda" else [])
        files = pkg.bench.file_backed.FileBackedBlocks(model, Path(args.output).with_suffix(".blocks.bin"))
    total = len(workload.tokens) * (1 + len(counts) * len(prefetches) * len(tiers))
    progress = Progress(total, enabled=not args.json_only)
    try:
        for tokens in workload.tokens:
            if files is not None:
                files.bind()
            base = run_config(model, workload, tokens, 0, 0, False, args.placement, pkg, progress)
            compare(base, base, workload.model_path)
            doc["results"].append(base)
            for count in counts:
                for prefetch in prefetches:
                    for tier in tiers:
                        row = run_config(
                            model,
                            workload,
                            tokens,
                            count,
                            prefetch,
                            non_blocking,
                            args.placement,
                            pkg,
                            progress,
                            tier,
                            files,
                        )
                        doc["results"].append(compare(row, base, workload.model_path))
    finally:
        if files is not None:
            files.path.unlink(missing_ok=True)
    if args.compare_native:
        doc["native_comparison"] = run_native_comparison(model, workload, args)
    progress.close()
    report = pkg.bench.report
    card_gb = doc["machine"]["gpu_memory_gb"] if workload.device.type == "cuda" else None
    doc["recommendation"] = report.recommendation(doc["results"], card_gb)
    if args.chart:
        title = f"synthetic {workload.preset}, {workload.layers} blocks ({doc['machine']['gpu'] or 'CPU'})"
        report.write_chart(doc["results"], args.chart, title)
        doc["chart"] = args.chart

    Path(args.output).write_text(json.dumps(doc, indent=2))
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        print(summary_header(doc))
        print(format_table(doc))
        if "native_comparison" in doc:
            print(format_native(doc["native_comparison"]))
        print(doc["recommendation"])
        if args.chart:
            print(f"Chart written to {args.chart}")
        print(f"Results written to {args.output}")
    return 0


def run_native_comparison(model, workload: Workload, args) -> dict[str, object]:
    """ComfyUI's own offloading at the same VRAM budget, when ComfyUI is importable."""
    import os

    path = args.comfyui_path or next(
        (p for p in os.environ.get("COMFYUI_PATH", "").split(os.pathsep) if p), None
    )
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        import comfy.cli_args

        if workload.device.type == "cpu":
            comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
    except ImportError as e:
        message = (
            f"ComfyUI is not importable ({e}), so --compare-native was skipped. Pass --comfyui-path "
            "(or set COMFYUI_PATH) and run with ComfyUI's requirements installed."
        )
        print(message, file=sys.stderr)
        return {"skipped": message}
    native = importlib.import_module(f"{PACKAGE}.bench.native")
    return native.run(model, workload)


def format_native(native: dict[str, object]) -> str:
    if "rows" not in native:
        return native.get("skipped", "")
    lines = [
        f"ComfyUI {native['comfyui_version']} native offloading at the same weight VRAM budget "
        f"({native['device']}):",
        "tokens  blocks  budget MB  ours s/step  native s/step  ours/native  ours peak MB  native peak MB",
    ]
    for r in native["rows"]:
        lines.append(
            f"{r['tokens']:>6}  {r['blocks_swapped']:>6}  {_cell(r['weight_budget_mb']):>9}  "
            f"{r['blockswap_step_s']:>11}  {r['native_step_s']:>13}  {r['blockswap_vs_native']:>11}  "
            f"{_cell(r['blockswap_peak_mb']):>12}  {_cell(r['native_peak_mb']):>14}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Inside ComfyUI: the user's file, ComfyUI's WanModel, every contender
# ----------------------------------------------------------------------------------------------

COMFY_COLUMNS = [
    ("contender", "contender"),
    ("video", "video"),
    ("tokens", "tokens"),
    ("blocks_to_swap", "swap"),
    ("prefetch_blocks", "pf"),
    ("step_time_s", "step s"),
    ("time_difference_percent", "vs resident %"),
    ("load_time_s", "load s"),
    ("weights_on_device_mb", "weights MB"),
    ("peak_vram_mb", "peak VRAM MB"),
    ("copy_ms_per_block", "copy ms/blk"),
    ("compute_ms_per_block", "compute ms/blk"),
    ("bytes_moved_per_step", "MB/step"),
]


def comfy_points(args, on_gpu: bool, cb) -> list:
    if args.tokens and args.resolution:
        raise SystemExit("give either --tokens or --resolution/--frames, not both")
    if args.resolution:
        return [cb.VideoPoint(*args.resolution, args.frames)]
    if args.tokens:
        return [cb.point_for_tokens(t) for t in args.tokens]
    # GPU: a 480p 81-frame video (32,760 tokens) and a single frame (1,560); CPU: one small frame.
    return (
        [cb.VideoPoint(832, 480, 81), cb.VideoPoint(832, 480, 1)] if on_gpu else [cb.VideoPoint(128, 128, 1)]
    )


def main_comfyui(args, parser, pkg) -> int:
    cb = importlib.import_module(f"{PACKAGE}.bench.comfy_bench")
    report = pkg.bench.report
    import comfy.model_management as mm

    device = mm.get_torch_device()
    on_gpu = device.type == "cuda"
    path = Path(args.model_path)
    if not path.is_file():
        raise SystemExit(f"--model-path: no such file: {path}")
    prefetches = args.prefetch if args.prefetch is not None else ([1] if on_gpu else [0])
    non_blocking = args.non_blocking or on_gpu and args.prefetch is None
    points = comfy_points(args, on_gpu, cb)
    counts: list[int] = []

    def counts_for(num_blocks: int) -> list[int]:
        counts[:] = swap_counts(args, num_blocks)
        return counts

    spec = cb.Spec(
        model_path=str(path),
        points=points,
        counts_for=counts_for,
        prefetches=prefetches,
        non_blocking=non_blocking,
        steps=args.steps,
        text_tokens=512,
        vram_limit_gb=args.vram_limit,
        auto=args.auto,
        fp8_optimization=args.fp8_optimization,
        comfyui_gguf_path=args.comfyui_gguf,
        progress=Progress(1 + len(points) * 8, enabled=not args.json_only),
    )
    result = cb.Runner(spec, pkg).run()
    spec.progress.close()
    rows = result.pop("rows")
    bases = {r["video"]: r for r in rows if r["contender"] == "resident" and not r["error"]}
    card_gb = args.vram_limit or (pkg.utils.machine_info()["gpu_memory_gb"] if on_gpu else None)
    for row in rows:
        row["memory"] = {
            "gpu_peak_allocated_mb": row.get("peak_vram_mb", NO_GPU),
            "cpu_rss_mb": row.get("cpu_rss_mb"),
        }
        base = bases.get(row["video"])
        if row["error"] or base is None:
            for key in ORIGINAL_ROW_KEYS:
                row.setdefault(key, None)
            row["model_path"] = str(path)
        else:
            compare(row, base, str(path))
        row["fits_card"] = report.fits(row, card_gb * 1024 if card_gb else None)
    largest = max(points, key=lambda p: p.width * p.height * p.frames).label
    doc: dict[str, object] = {
        "tool": "test_performance.py",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke_run": not on_gpu,
        "machine": pkg.utils.machine_info(),
        "workload": {
            "model_path": str(path),
            "model_runner": f"ComfyUI {result['comfyui_version']} {result['model_class']} (WAN Model Loader path)",
            "layers": result["blocks"],
            "videos": [p.label for p in points],
            "blocks_to_swap": counts,
            "prefetch_blocks": prefetches,
            "non_blocking": non_blocking,
            "steps": args.steps,
            "text_tokens": 512,
            "vram_limit_gb": args.vram_limit,
            "card_gb": card_gb,
            "fp8_optimization": args.fp8_optimization,
            "load_time_s": result["file_load_s"],
        },
        "comfyui": result,
        "contenders": list(dict.fromkeys(r["contender"] for r in rows)),
        "results": rows,
        "recommendation": report.recommendation(rows, card_gb, largest),
        "auto_vs_best_fixed": report.auto_vs_best_fixed(rows),
    }
    if args.chart:
        title = f"{path.name}: {result['blocks']} blocks, ComfyUI {result['comfyui_version']} ({doc['machine']['gpu'] or 'CPU'})"
        report.write_chart(rows, args.chart, title)
        doc["chart"] = args.chart
    Path(args.output).write_text(json.dumps(doc, indent=2))
    if args.json_only:
        print(json.dumps(doc, indent=2))
        return 0
    m = doc["machine"]
    print(
        f"Machine: {m['gpu'] or 'CPU only'}; CPU {m['cpu']} x{m['cpu_cores']}, {m['ram_gb']} GB RAM; "
        f"torch {m['torch']}; ComfyUI {result['comfyui_version']} on {result['device']}"
    )
    print(
        f"Model: {path} -> {result['model_class']}, {result['blocks']} blocks, weights {result['weight_dtype']}, "
        f"compute {result['compute_dtype']}, loaded in {result['file_load_s']:.2f} s"
        + (f"; simulated card: {args.vram_limit:g} GB" if args.vram_limit else "")
    )
    if not on_gpu:
        print(
            "NOTE: no GPU - ComfyUI runs in CPU mode: a smoke run of every contender's machinery, not a "
            "performance result. VRAM columns: " + NO_GPU
        )
    print(format_rows(rows, COMFY_COLUMNS))
    for skipped in result["skipped_contenders"]:
        print(f"Not measured: {skipped['contender']}: {skipped['reason']}")
    for row in rows:
        if row["error"]:
            print(
                f"Failed: {row['contender']} swap={row['blocks_to_swap']} at {row['video']}: {row['error']}"
            )
    print(doc["recommendation"])
    for line in doc["auto_vs_best_fixed"]:
        print(line["text"])
    if args.chart:
        print(f"Chart written to {args.chart}")
    print(f"Results written to {args.output}")
    return 0


def format_rows(rows: list[dict[str, object]], columns) -> str:
    table = []
    for r in rows:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            if key == "bytes_moved_per_step" and isinstance(value, int):
                value = load_package().utils.mib(value)
            if r.get("error") and key not in ("contender", "video", "blocks_to_swap", "prefetch_blocks"):
                value = "error" if key == "step_time_s" else None
            cells.append(_cell(value))
        table.append(cells)
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""`test_performance.py --model-path FILE` inside ComfyUI: the user's file, ComfyUI's WanModel, every contender.

The file is loaded by the pack's own WAN Model Loader path (`loader.load_safetensors_model` /
`load_gguf_model`), so the model is the one ComfyUI samples with (RoPE, its ops, fp8 and GGUF layers).
Each contender then gets the same model weights, inputs and card:

- ``resident``: ComfyUI loads the model its normal way (the reference every cost is relative to);
- ``blockswap``: the pack's BlockSwap at each blocks_to_swap / prefetch value;
- ``comfyui_lowvram``: ComfyUI's own partial load, given as its ``lowvram_model_memory`` the VRAM the
  BlockSwap row at the same blocks_to_swap used for weights (resident parts plus slots): equal VRAM;
- ``comfyui_dynamic_vram``: ComfyUI's dynamic VRAM (0.16+ on an NVIDIA/AMD GPU), which sizes itself to
  the free VRAM: one row per token count;
- ``comfyui_gguf``: ComfyUI-GGUF's loader and its own offloading at the same budget, for GGUF files.

A simulated card (`--vram-limit`) is the rest of the GPU occupied by one allocation before any contender
loads; the resident reference runs before that, on the whole GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..utils import mib, process_rss
from .timing import BlockTimer, CastTimer, Spans, TimedTransport, clock_for

log = logging.getLogger(__name__)

NO_GPU = "n/a (no GPU)"
GGUF_PACK_NAME = "ComfyUI-GGUF"


@dataclasses.dataclass(frozen=True)
class VideoPoint:
    """A video size: what a user picks in ComfyUI (pixels and frames), turned into latent tokens."""

    width: int
    height: int
    frames: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def point_for_tokens(tokens: int) -> VideoPoint:
    """A video of about `tokens` tokens: 832x480 frames (1,560 tokens per latent frame), or a square
    single frame below that."""
    per_frame = (480 // 16) * (832 // 16)
    if tokens >= per_frame:
        latent_frames = max(1, round(tokens / per_frame))
        return VideoPoint(832, 480, (latent_frames - 1) * 4 + 1)
    side = max(1, round(tokens**0.5)) * 16
    return VideoPoint(side, side, 1)


@dataclasses.dataclass
class Spec:
    """What to measure (filled by test_performance.py from its arguments)."""

    model_path: str
    points: list[VideoPoint]
    counts_for: object  # fn(number of blocks) -> blocks_to_swap values (known once the file is read)
    prefetches: list[int]
    non_blocking: bool
    steps: int
    text_tokens: int
    vram_limit_gb: float | None = None
    auto: bool = False  # also the pack's auto_blocks_to_swap, loaded per point with that point's memory need
    fp8_optimization: str = "disabled"
    comfyui_gguf_path: str | None = None
    progress: object = None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def comfyui_version() -> str | None:
    try:
        import comfyui_version as version_module

        return version_module.__version__
    except ImportError:
        return None


def load_with_pack_loader(path: str, fp8_optimization: str = "disabled"):
    """(patcher, seconds): the WAN Model Loader's own path. Its errors (bad file, not WAN) pass through."""
    from .. import loader

    start = time.perf_counter()
    if path.lower().endswith(".gguf"):
        patcher = loader.load_gguf_model(path)
    else:
        patcher = loader.load_safetensors_model(path, fp8_optimization=fp8_optimization)
    return patcher, time.perf_counter() - start


def find_comfyui_gguf(explicit: str | None) -> Path | None:
    """ComfyUI-GGUF's folder: --comfyui-gguf, $COMFYUI_GGUF_PATH, or next to this pack in custom_nodes."""
    candidates = [explicit, os.environ.get("COMFYUI_GGUF_PATH")]
    here = Path(__file__).resolve().parents[1]
    if here.parent.name == "custom_nodes":
        candidates.append(str(here.parent / GGUF_PACK_NAME))
    for candidate in filter(None, candidates):
        if (Path(candidate) / "nodes.py").is_file():
            return Path(candidate)
    return None


def import_comfyui_gguf(folder: Path):
    """ComfyUI-GGUF's package, imported the way ComfyUI imports a custom node (once per process)."""
    if f"{GGUF_PACK_NAME}.nodes" in sys.modules:
        return sys.modules[f"{GGUF_PACK_NAME}.nodes"], sys.modules[f"{GGUF_PACK_NAME}.ops"]
    spec = importlib.util.spec_from_file_location(
        GGUF_PACK_NAME, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[GGUF_PACK_NAME] = module
    spec.loader.exec_module(module)
    return sys.modules[f"{GGUF_PACK_NAME}.nodes"], sys.modules[f"{GGUF_PACK_NAME}.ops"]


def load_with_comfyui_gguf(path: str, gguf_nodes):
    """(patcher, seconds) from ComfyUI-GGUF's own "Unet Loader (GGUF)" node, the file's folder added to
    ComfyUI's diffusion_models folders for the call."""
    import folder_paths

    folder, name = os.path.split(os.path.abspath(path))
    key = "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"
    paths = folder_paths.folder_names_and_paths[key][0]
    added = folder not in paths
    if added:
        paths.append(folder)
    # Its folder list is cached by name; the cache must see the folder just added.
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    try:
        start = time.perf_counter()
        (patcher,) = gguf_nodes.UnetLoaderGGUF().load_unet(name)
        return patcher, time.perf_counter() - start
    finally:
        if added:
            paths.remove(folder)
        if isinstance(cache, dict):
            cache.clear()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def compute_dtype(patcher) -> torch.dtype:
    model = patcher.model
    return model.manual_cast_dtype or model.get_dtype()


def video_inputs(patcher, point: VideoPoint, text_tokens: int, device: torch.device, seed: int = 0):
    """(inputs of WanModel.forward, tokens) for a video of `point`'s size.

    Latent geometry from the model itself: the VAE compresses 4x in time and 8x in space (16x for the
    2.2 VAE of the 5B, whose latents have 48 channels); tokens are latent patches of the model's patch
    size. The latent gets as many channels as the patch embedding takes (i2v models take image latents
    concatenated to the noise)."""
    dm = patcher.model.diffusion_model
    in_channels = dm.patch_embedding.weight.shape[1]
    latent_channels = patcher.model.latent_format.latent_channels
    spatial = 16 if latent_channels == 48 else 8
    pt, ph, pw = dm.patch_size
    frames = (point.frames - 1) // 4 + 1
    height, width = point.height // spatial, point.width // spatial
    tokens = -(-frames // pt) * -(-height // ph) * -(-width // pw)
    dtype = compute_dtype(patcher)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(1, in_channels, frames, height, width, generator=g).to(device, dtype),
        "timestep": torch.full((1,), 500.0, device=device),
        "context": torch.randn(1, text_tokens, 4096, generator=g).to(device, dtype),
    }
    if getattr(dm, "img_emb", None) is not None:
        inputs["clip_fea"] = torch.randn(1, 257, 1280, generator=g).to(device, dtype)
    return inputs, tokens


# ----------------------------------------------------------------------------------------------
# The simulated card
# ----------------------------------------------------------------------------------------------


def occupy_vram(device: torch.device, limit_gb: float) -> tuple[torch.Tensor, int]:
    """Allocate everything above `limit_gb` of free VRAM, so ComfyUI (which plans with the free memory)
    and every contender see a card of that size. Returns the allocation and its size."""
    free, total = torch.cuda.mem_get_info(device)
    limit = int(limit_gb * 2**30)
    if free <= limit:
        raise SystemExit(
            f"--vram-limit {limit_gb:g}: this GPU has only {free / 2**30:.1f} GB free "
            f"(of {total / 2**30:.1f} GB), nothing to occupy"
        )
    occupied = free - limit
    block = torch.empty(occupied, dtype=torch.uint8, device=device)
    log.info("[BlockSwap] benchmark: %.1f GB of VRAM occupied; %.1f GB left", occupied / 2**30, limit_gb)
    return block, occupied


# ----------------------------------------------------------------------------------------------
# Measuring one loaded contender
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cast_owners(pkg, gguf_ops_module=None) -> list[tuple[object, str]]:
    import comfy.ops

    owners = [(comfy.ops, "cast_bias_weight"), (pkg.quant.ops, "cast_gguf_bias_weight")]
    if gguf_ops_module is not None:
        owners.append((gguf_ops_module.GGMLLayer, "cast_bias_weight"))
    return owners


def measure(
    patcher, inputs, steps: int, device: torch.device, occupied: int, pkg, engine=None, gguf_ops=None
):
    """Warm-up run, then `steps` timed forwards in one run (ComfyUI's pre_run / cleanup around each run,
    as its sampler does). Returns the numbers every row shares."""
    dm = patcher.model.diffusion_model
    clock = clock_for(device)
    copy_spans = Spans(clock)
    if engine is not None:
        if device.type == "cuda":
            engine.debug = True  # copy-stream events (the engine's own telemetry)
        else:
            from ..block_manager import SyncTransport

            engine.transport_factory = lambda n: TimedTransport(SyncTransport(), copy_spans)
    with torch.inference_mode():
        patcher.pre_run()
        try:
            dm(**inputs)
            _sync(device)
        finally:
            patcher.cleanup()
        if engine is not None:
            engine.counters.reset()
        copy_spans.reset()
        casts = CastTimer(clock)
        for owner, name in _cast_owners(pkg, gguf_ops):
            casts.wrap(owner, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        patcher.pre_run()
        timer = BlockTimer(dm.blocks, clock)  # after the engine's hooks (see BlockTimer)
        try:
            for _ in range(steps):
                start = time.perf_counter()
                dm(**inputs)
                _sync(device)
                times.append(time.perf_counter() - start)
        finally:
            timer.remove()
            casts.restore()
            patcher.cleanup()
    block_runs = max(timer.spans.count, 1)
    block_ms = timer.spans.total_ms()
    cast_ms = casts.spans.total_ms()
    peak = torch.cuda.max_memory_allocated(device) - occupied if device.type == "cuda" else None
    numbers = {
        "step_time_s": round(statistics.median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "block_ms_per_block": round(block_ms / block_runs, 3),
        "peak_vram_mb": mib(peak) if peak is not None else NO_GPU,
        "cpu_rss_mb": mib(process_rss()),
    }
    if engine is not None:
        counters = engine.counters
        stats = engine.last_run
        if device.type == "cuda":
            copy_ms = stats.copy_ms if stats is not None else 0.0
            stall_ms = stats.stall_ms if stats is not None else 0.0
        else:
            copy_ms = copy_spans.total_ms()
            stall_ms = copy_ms  # on a CPU every copy runs on the compute thread: compute waits for all of it
        numbers.update(
            copy_ms_per_block=round(copy_ms / max(counters.copies, 1), 3),
            compute_ms_per_block=numbers["block_ms_per_block"],
            bytes_moved_per_step=int(counters.bytes_copied / steps),
            stall_ms_per_step=round(stall_ms / steps, 2),
            on_demand_copies_per_step=counters.misses / steps,
        )
    else:
        numbers.update(
            copy_ms_per_block=round(cast_ms / block_runs, 3),
            compute_ms_per_block=round(max(block_ms - cast_ms, 0.0) / block_runs, 3),
            bytes_moved_per_step=int(casts.bytes / steps),
            stall_ms_per_step=None,
            on_demand_copies_per_step=None,
        )
    return numbers


def _fully_loaded(patcher) -> bool:
    """Whether ComfyUI loaded all it was asked to (no partial load of its own on top)."""
    try:
        return patcher.loaded_size() >= patcher.model_size() - 1
    except Exception:  # patchers without the figures (dynamic VRAM): not a partial load we can see
        return True


def _free_device(device: torch.device) -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """Runs the contenders of one Spec and collects their rows."""

    def __init__(self, spec: Spec, pkg):
        import comfy.model_management as mm

        self.spec, self.pkg, self.mm = spec, pkg, mm
        self.device = mm.get_torch_device()
        self.occupied = 0
        self.rows: list[dict[str, object]] = []
        self.skipped: list[dict[str, str]] = []

    # -- one row -------------------------------------------------------------------------------

    def _row(self, contender: str, point: VideoPoint, tokens: int, **fields) -> dict[str, object]:
        row = {
            "contender": contender,
            "mode": contender,
            "video": point.label,
            "tokens": tokens,
            "blocks_to_swap": None,
            "prefetch_blocks": None,
            "non_blocking": None,
            "error": None,
        }
        row.update(fields)
        if self.spec.progress is not None:
            self.spec.progress.step(f"{contender} {point.label} swap={row['blocks_to_swap']}")
        self.rows.append(row)
        return row

    def _measure_points(
        self, contender, patcher, file_load_s, device_load_s, fields, engine=None, gguf_ops=None
    ):
        budget = mib(patcher.loaded_size()) if hasattr(patcher, "loaded_size") else None
        fully = _fully_loaded(patcher)
        rows = []
        for point in self.spec.points:
            inputs, tokens = video_inputs(patcher, point, self.spec.text_tokens, self.device)
            try:
                numbers = measure(
                    patcher, inputs, self.spec.steps, self.device, self.occupied, self.pkg, engine, gguf_ops
                )
            except Exception as exc:  # a contender that fails is a result, not the end of the run
                log.warning("[BlockSwap] benchmark: %s at %s failed: %s", contender, point.label, exc)
                rows.append(self._row(contender, point, tokens, error=_describe(exc), **fields))
                continue
            finally:
                del inputs
            rows.append(
                self._row(
                    contender,
                    point,
                    tokens,
                    file_load_s=round(file_load_s, 3),
                    device_load_s=round(device_load_s, 3),
                    load_time_s=round(file_load_s + device_load_s, 3),
                    weights_on_device_mb=budget,
                    comfyui_partial_load=not fully,
                    **fields,
                    **numbers,
                )
            )
        return rows

    def _error_rows(self, contender: str, exc: BaseException, fields) -> None:
        log.warning("[BlockSwap] benchmark: %s failed: %s", contender, exc)
        for point in self.spec.points:
            self._row(contender, point, None, error=_describe(exc), **fields)

    # -- contenders ----------------------------------------------------------------------------

    def resident(self, patcher, file_load_s):
        start = time.perf_counter()
        self.mm.load_models_gpu([patcher])
        _sync(self.device)
        load_s = time.perf_counter() - start
        try:
            return self._measure_points("resident", patcher, file_load_s, load_s, {"blocks_to_swap": 0})
        finally:
            _free_device(self.device)

    def blockswap(self, patcher, file_load_s, count: int, prefetch: int) -> float | None:
        """BlockSwap rows at `count`; returns the VRAM it used for weights (bytes), the native budget."""
        from ..callbacks import apply_block_swap, plan_of
        from ..config import SwapConfig

        fields = {
            "blocks_to_swap": count,
            "prefetch_blocks": prefetch,
            "non_blocking": self.spec.non_blocking,
        }
        swapped = None
        try:
            config = SwapConfig(
                blocks_to_swap=count,
                prefetch_blocks=prefetch,
                use_non_blocking=self.spec.non_blocking,
                override_dynamic_vram=True,  # a benchmark of block swapping swaps, whatever the patcher
            )
            swapped = apply_block_swap(patcher, config)
            engine = plan_of(swapped).engine
            start = time.perf_counter()
            self.mm.load_models_gpu([swapped])
            _sync(self.device)
            load_s = time.perf_counter() - start
            budget = swapped.loaded_size()
            self._measure_points("blockswap", swapped, file_load_s, load_s, fields, engine=engine)
            return budget
        except Exception as exc:
            self._error_rows("blockswap", exc, fields)
            return None
        finally:
            _free_device(self.device)
            plan = plan_of(swapped) if swapped is not None else None
            if plan is not None:
                # The slabs go back to the weights (unpinned) before another contender loads them.
                plan.engine.forget_slabs()

    def blockswap_auto(self, patcher, file_load_s, prefetch: int) -> None:
        """auto_blocks_to_swap rows: for each point ComfyUI loads the model as its sampler does (with that
        point's memory need), the plan fits its grant, and the row records the blocks it swapped."""
        from ..callbacks import apply_block_swap, plan_of
        from ..config import SwapConfig

        config = SwapConfig(
            prefetch_blocks=prefetch,
            use_non_blocking=self.spec.non_blocking,
            override_dynamic_vram=True,
            auto_blocks_to_swap=True,
        )
        swapped = None
        try:
            swapped = apply_block_swap(patcher, config)
            plan = plan_of(swapped)
            for point in self.spec.points:
                inputs, tokens = video_inputs(swapped, point, self.spec.text_tokens, self.device)
                fields = {"prefetch_blocks": prefetch, "non_blocking": self.spec.non_blocking}
                try:
                    start = time.perf_counter()
                    need = swapped.memory_required(list(inputs["x"].shape))
                    self.mm.load_models_gpu([swapped], memory_required=need)
                    _sync(self.device)
                    load_s = time.perf_counter() - start
                    count = sum(1 for u in plan.engine.swapped_units if u.name.startswith("blocks."))
                    fields.update(
                        blocks_to_swap=count,
                        auto_grant_mb=mib(plan.last_grant) if plan.last_grant != float("inf") else None,
                    )
                    numbers = measure(
                        swapped, inputs, self.spec.steps, self.device, self.occupied, self.pkg, plan.engine
                    )
                except Exception as exc:
                    log.warning("[BlockSwap] benchmark: blockswap_auto at %s failed: %s", point.label, exc)
                    self._row("blockswap_auto", point, tokens, error=_describe(exc), **fields)
                    continue
                finally:
                    del inputs
                self._row(
                    "blockswap_auto",
                    point,
                    tokens,
                    file_load_s=round(file_load_s, 3),
                    device_load_s=round(load_s, 3),
                    load_time_s=round(file_load_s + load_s, 3),
                    weights_on_device_mb=mib(swapped.loaded_size()),
                    comfyui_partial_load=not _fully_loaded(swapped),
                    **fields,
                    **numbers,
                )
        except Exception as exc:
            self._error_rows("blockswap_auto", exc, {"prefetch_blocks": prefetch})
        finally:
            _free_device(self.device)
            plan = plan_of(swapped) if swapped is not None else None
            if plan is not None:
                plan.engine.forget_slabs()

    def lowvram(self, contender: str, patcher, file_load_s, count: int, budget: int, gguf_ops=None):
        """ComfyUI's own partial load of `patcher` with `budget` bytes for weights."""
        fields = {"blocks_to_swap": count}
        native = patcher.clone()
        try:
            start = time.perf_counter()
            loaded = self.mm.LoadedModel(native)
            loaded.model_load(lowvram_model_memory=budget)
            _sync(self.device)
            load_s = time.perf_counter() - start
            self._measure_points(contender, native, file_load_s, load_s, fields, gguf_ops=gguf_ops)
        except Exception as exc:
            self._error_rows(contender, exc, fields)
        finally:
            with contextlib.suppress(Exception):
                native.detach()
            _free_device(self.device)

    def dynamic_vram(self) -> None:
        """ComfyUI's dynamic VRAM, switched on as its main.py does, for a file loaded with it on."""
        import comfy.model_patcher

        reason = dynamic_vram_unavailable(self.device, self.spec.model_path)
        if reason:
            self.skipped.append({"contender": "comfyui_dynamic_vram", "reason": reason})
            return
        import comfy.memory_management

        saved = comfy.model_patcher.CoreModelPatcher, getattr(comfy.memory_management, "aimdo_enabled", False)
        try:
            _init_aimdo(self.device)
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            patcher, file_load_s = load_with_pack_loader(self.spec.model_path, self.spec.fp8_optimization)
            start = time.perf_counter()
            self.mm.load_models_gpu([patcher])
            _sync(self.device)
            load_s = time.perf_counter() - start
            self._measure_points("comfyui_dynamic_vram", patcher, file_load_s, load_s, {})
        except Exception as exc:
            self._error_rows("comfyui_dynamic_vram", exc, {})
        finally:
            comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled = saved
            _free_device(self.device)

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        spec = self.spec
        try:
            patcher, file_load_s = load_with_pack_loader(spec.model_path, spec.fp8_optimization)
        except (ValueError, OSError) as exc:  # the loader's own messages: bad file, not WAN, truncated
            raise SystemExit(f"--model-path: {exc}") from exc
        dm = patcher.model.diffusion_model
        counts = spec.counts_for(len(dm.blocks))
        info = {
            "comfyui_version": comfyui_version(),
            "device": str(self.device),
            "model_class": type(dm).__name__,
            "blocks": len(dm.blocks),
            "patch_size": list(dm.patch_size),
            "weight_dtype": str(patcher.model.get_dtype()).replace("torch.", ""),
            "compute_dtype": str(compute_dtype(patcher)).replace("torch.", ""),
            "file_load_s": round(file_load_s, 3),
            "vram_limit_gb": spec.vram_limit_gb,
        }
        self.resident(patcher, file_load_s)
        occupier = None
        if spec.vram_limit_gb is not None:
            occupier, self.occupied = occupy_vram(self.device, spec.vram_limit_gb)
        gguf_nodes = gguf_ops = gguf_patcher = None
        is_gguf = spec.model_path.lower().endswith(".gguf")
        if is_gguf:
            folder = find_comfyui_gguf(spec.comfyui_gguf_path)
            if folder is None:
                self.skipped.append(
                    {
                        "contender": "comfyui_gguf",
                        "reason": "ComfyUI-GGUF not found (--comfyui-gguf, $COMFYUI_GGUF_PATH or custom_nodes/)",
                    }
                )
            else:
                try:
                    gguf_nodes, gguf_ops = import_comfyui_gguf(folder)
                    gguf_patcher, gguf_load_s = load_with_comfyui_gguf(spec.model_path, gguf_nodes)
                except Exception as exc:
                    self._error_rows("comfyui_gguf", exc, {})
        try:
            for count in counts:
                budget = None
                for prefetch in spec.prefetches:
                    used = self.blockswap(patcher, file_load_s, count, prefetch)
                    budget = budget if budget is not None else used
                if budget is None:
                    # BlockSwap failed at this count: ComfyUI still gets the VRAM it would have used.
                    budget = planned_weight_bytes(patcher, count, spec.prefetches[0])
                self.lowvram("comfyui_lowvram", patcher, file_load_s, count, budget)
                if gguf_patcher is not None:
                    self.lowvram("comfyui_gguf", gguf_patcher, gguf_load_s, count, budget, gguf_ops=gguf_ops)
            if spec.auto:
                self.blockswap_auto(patcher, file_load_s, spec.prefetches[0])
            del patcher, gguf_patcher
            _free_device(self.device)
            self.dynamic_vram()
        finally:
            del occupier
            _free_device(self.device)
        return {**info, "rows": self.rows, "skipped_contenders": self.skipped}


def planned_weight_bytes(patcher, count: int, prefetch: int) -> int:
    """The VRAM a BlockSwap of the last `count` blocks plans for weights: the model less those blocks,
    plus its slots (prefetch + 1, each as large as the largest swapped block)."""
    from .timing import raw_nbytes

    blocks = list(patcher.model.diffusion_model.blocks)
    swapped = [sum(raw_nbytes(t) for t in b.parameters()) for b in blocks[len(blocks) - count :]]
    if not swapped:
        return patcher.model_size()
    return patcher.model_size() - sum(swapped) + min(prefetch + 1, len(swapped)) * max(swapped)


def dynamic_vram_unavailable(device: torch.device, model_path: str) -> str | None:
    """Why ComfyUI's dynamic VRAM cannot be a contender here, or None when it can."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no dynamic VRAM (0.16+)"
    if device.type != "cuda":
        return "ComfyUI's dynamic VRAM needs a CUDA GPU (it is off in CPU mode)"
    if model_path.lower().endswith(".gguf"):
        return "GGUF models do not use dynamic VRAM (GGUF layers cast their own weights)"
    try:
        import comfy_aimdo.control  # noqa: F401
    except ImportError:
        return "comfy-aimdo (ComfyUI's dynamic VRAM allocator) is not installed"
    return None


def _init_aimdo(device: torch.device) -> None:
    """Start comfy-aimdo for `device` as ComfyUI's main.py does at start-up (the benchmark has no main.py).
    Its call signatures changed between releases: the newest first."""
    import comfy_aimdo.control as control

    try:
        control.init(simple_vram_headroom=None)
    except TypeError:
        control.init()
    index = device.index or 0
    try:
        ok = control.init_devices([(index, 0)])
    except TypeError:
        ok = control.init_devices([index])
    if not ok:
        raise RuntimeError("comfy-aimdo did not start on this GPU")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

"""`test_performance.py --compare-native`: this pack's block swap against ComfyUI's own offloading.

Both run the same ComfyUI WanModel (built by `comfy.sd` from the benchmark model's weights) on the
same inputs. Our run goes first; ComfyUI then gets the VRAM our run used for weights (resident blocks
plus slots) as its `lowvram_model_memory` budget, the figure its own loader plans with, and loads
the model its way (layer-by-layer casting, async offload streams in 0.3.76+).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from ..utils import mib

log = logging.getLogger(__name__)

LATENT_HEIGHT, LATENT_WIDTH = 60, 104  # 480x832 video: 30 x 52 = 1560 tokens per latent frame


def _latent_frames(tokens: int) -> int:
    return max(1, round(tokens / (LATENT_HEIGHT // 2 * LATENT_WIDTH // 2)))


def _timed_steps(diffusion_model, inputs, steps: int, device: torch.device) -> tuple[list[float], int | None]:
    with torch.inference_mode():
        diffusion_model(**inputs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            diffusion_model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def run(model, workload) -> dict[str, object]:
    import comfy.model_management as mm
    import comfy.sd

    from ..callbacks import apply_block_swap, plan_of
    from ..config import SwapConfig

    device = mm.get_torch_device()
    patcher = comfy.sd.load_diffusion_model_state_dict(
        {k: v for k, v in model.state_dict().items()}, model_options={"dtype": workload.dtype}
    )
    diffusion_model = patcher.model.diffusion_model
    num_blocks = len(diffusion_model.blocks)
    dtype = next(diffusion_model.blocks[0].parameters()).dtype
    rows = []
    for tokens in workload.tokens:
        frames = _latent_frames(tokens)
        g = torch.Generator().manual_seed(0)
        inputs = {
            "x": torch.randn(
                1,
                patcher.model.latent_format.latent_channels,
                frames,
                LATENT_HEIGHT,
                LATENT_WIDTH,
                generator=g,
            ).to(device, dtype),
            "timestep": torch.full((1,), 500.0, device=device),
            "context": torch.randn(1, workload.text_tokens, 4096, generator=g).to(device, dtype),
        }
        row: dict[str, object] = {
            "tokens": frames * (LATENT_HEIGHT // 2) * (LATENT_WIDTH // 2),
            "blocks_swapped": num_blocks,
        }

        mm.unload_all_models()
        swapped = apply_block_swap(
            patcher, SwapConfig(blocks_to_swap=num_blocks, prefetch_blocks=1, use_non_blocking=True)
        )
        mm.load_models_gpu([swapped])
        budget = swapped.loaded_size()
        swapped.pre_run()
        try:
            times, peak = _timed_steps(diffusion_model, inputs, workload.steps, device)
        finally:
            swapped.cleanup()
        row.update(
            blockswap_step_s=round(statistics.median(times), 4),
            blockswap_peak_mb=mib(peak),
            weight_budget_mb=mib(budget),
        )
        mm.unload_all_models()
        # Give the slabs back (unpinned, owned by the weights again) before ComfyUI loads its way.
        plan_of(swapped).engine.forget_slabs()

        native = patcher.clone()
        loaded = mm.LoadedModel(native)
        loaded.model_load(lowvram_model_memory=budget)
        try:
            times, peak = _timed_steps(diffusion_model, inputs, workload.steps, device)
        finally:
            native.detach()
        row.update(native_step_s=round(statistics.median(times), 4), native_peak_mb=mib(peak))
        row["blockswap_vs_native"] = round(row["blockswap_step_s"] / row["native_step_s"], 3)
        rows.append(row)
        log.info("[BlockSwap] native comparison: %s", row)
    mm.unload_all_models()
    return {"comfyui_version": _comfyui_version(), "device": str(device), "rows": rows}


def _comfyui_version() -> str | None:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return None

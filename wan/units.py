"""Which swappable units a WAN diffusion model has, and the order they run in.

Pure torch: works on ComfyUI's `comfy.ldm.wan.model.WanModel` family and on the synthetic model of
`bench/synthetic_model.py`, which share attribute names (`blocks`, `vace_blocks`, `vace_layers_mapping`,
`text_embedding`, `img_emb`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..block_manager import choose_swapped_blocks


def is_wan_model(diffusion_model: object) -> bool:
    """WAN-family transformers: a `blocks` ModuleList whose blocks carry a direct `modulation`."""
    blocks = getattr(diffusion_model, "blocks", None)
    return (
        isinstance(diffusion_model, nn.Module)
        and isinstance(blocks, nn.ModuleList)
        and len(blocks) > 0
        and isinstance(getattr(blocks[0], "modulation", None), nn.Parameter)
        and isinstance(getattr(diffusion_model, "text_embedding", None), nn.Module)
    )


def vace_blocks(diffusion_model: nn.Module) -> nn.ModuleList | None:
    blocks = getattr(diffusion_model, "vace_blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def vace_mapping(diffusion_model: nn.Module) -> dict[int, int]:
    """Main block index -> VACE block index that runs right after it."""
    mapping = getattr(diffusion_model, "vace_layers_mapping", None)
    if isinstance(mapping, dict):
        return dict(mapping)
    vace = vace_blocks(diffusion_model)
    if vace is None:
        return {}
    # Same rule the VACE reference uses: VACE blocks sit at evenly spaced main blocks.
    step = len(diffusion_model.blocks) // len(vace)
    return {i * step: i for i in range(len(vace))}


def execution_order(diffusion_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every unit the engine may swap, in the order one forward pass runs them."""
    order: list[tuple[str, nn.Module]] = [("text_embedding", diffusion_model.text_embedding)]
    img_emb = getattr(diffusion_model, "img_emb", None)
    if isinstance(img_emb, nn.Module):
        order.append(("img_emb", img_emb))
    vace = vace_blocks(diffusion_model)
    mapping = vace_mapping(diffusion_model) if vace is not None else {}
    for i, block in enumerate(diffusion_model.blocks):
        order.append((f"blocks.{i}", block))
        j = mapping.get(i)
        if j is not None:
            order.append((f"vace_blocks.{j}", vace[j]))
    return order


@dataclasses.dataclass(frozen=True)
class WanSwapSelection:
    """What to swap, already checked against the model (see `select_wan_units`)."""

    units: list[tuple[str, nn.Module]]
    swap: list[str]
    blocks_to_swap: int
    vace_blocks_to_swap: int
    # auto_blocks_to_swap: candidates[k] is the swap set with k blocks swapped, k = 0 .. all blocks.
    candidates: list[list[str]] = dataclasses.field(default_factory=list)


def select_wan_units(
    diffusion_model: nn.Module,
    blocks_to_swap: int,
    vace_blocks_to_swap: int = 0,
    offload_txt_emb: bool = False,
    offload_img_emb: bool = False,
    placement: str = "tail",
) -> WanSwapSelection:
    """Translate node settings into engine units and swap names.

    vace_blocks_to_swap = 0 means "auto": swap the same share of VACE blocks as of main blocks.
    Values out of range raise ValueError (the node clamps with a warning before calling this).
    """
    units = execution_order(diffusion_model)
    block_names = [f"blocks.{i}" for i in range(len(diffusion_model.blocks))]
    swap = choose_swapped_blocks(block_names, blocks_to_swap, placement)
    vace = vace_blocks(diffusion_model)
    n_vace = len(vace) if vace is not None else 0
    if vace_blocks_to_swap == 0 and n_vace:
        vace_count = round(n_vace * blocks_to_swap / len(block_names))
    else:
        vace_count = vace_blocks_to_swap
    if n_vace == 0 and vace_blocks_to_swap:
        raise ValueError(
            f"vace_blocks_to_swap must be 0 for a model without VACE blocks (got {vace_blocks_to_swap})"
        )
    if n_vace:
        swap += choose_swapped_blocks(
            [f"vace_blocks.{j}" for j in range(n_vace)], vace_count, placement, "vace_blocks_to_swap"
        )
    if offload_txt_emb:
        swap.append("text_embedding")
    if offload_img_emb and any(name == "img_emb" for name, _ in units):
        swap.append("img_emb")
    return WanSwapSelection(units, swap, blocks_to_swap, vace_count)


def auto_wan_selection(
    diffusion_model: nn.Module, offload_txt_emb: bool = False, offload_img_emb: bool = False
) -> WanSwapSelection:
    """For auto_blocks_to_swap: nothing swapped yet (but the embeddings asked for), and every swap set a
    byte budget may pick: the last k blocks with the same share of VACE blocks, for k = 0 .. all."""
    sets = [
        select_wan_units(diffusion_model, k, 0, offload_txt_emb, offload_img_emb).swap
        for k in range(len(diffusion_model.blocks) + 1)
    ]
    first = select_wan_units(diffusion_model, 0, 0, offload_txt_emb, offload_img_emb)
    return dataclasses.replace(first, candidates=sets)

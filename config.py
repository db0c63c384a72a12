"""Node settings, validated once, with errors that name the input and its valid range. No ComfyUI."""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

# Widget ranges. The largest released WAN has 40 blocks; other WAN-architecture models (LongCat) 48.
MAX_BLOCKS = 64
MAX_VACE_BLOCKS = 32
MAX_PREFETCH = 8


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer between {low} and {high} (got {value!r})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high} (got {value})")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (got {value!r})")


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """The inputs of the WAN 2.2 BlockSwap node (and of the looper nodes that share them)."""

    blocks_to_swap: int = 20
    offload_txt_emb: bool = False
    offload_img_emb: bool = False
    use_non_blocking: bool = False
    vace_blocks_to_swap: int = 0  # 0 = auto: the same share of VACE blocks as of main blocks
    prefetch_blocks: int = 0
    block_swap_debug: bool = False
    override_dynamic_vram: bool = False

    def __post_init__(self):
        _check_int("blocks_to_swap", self.blocks_to_swap, 0, MAX_BLOCKS)
        _check_int("vace_blocks_to_swap", self.vace_blocks_to_swap, 0, MAX_VACE_BLOCKS)
        _check_int("prefetch_blocks", self.prefetch_blocks, 0, MAX_PREFETCH)
        for name in (
            "offload_txt_emb",
            "offload_img_emb",
            "use_non_blocking",
            "block_swap_debug",
            "override_dynamic_vram",
        ):
            _check_bool(name, getattr(self, name))

    def fitted_to(self, num_blocks: int, num_vace_blocks: int) -> SwapConfig:
        """Clamp block counts to what the model has, with one warning per clamp."""
        changes = {}
        if self.blocks_to_swap > num_blocks:
            log.warning(
                "[BlockSwap] blocks_to_swap=%d but the model has %d blocks: swapping all %d",
                self.blocks_to_swap,
                num_blocks,
                num_blocks,
            )
            changes["blocks_to_swap"] = num_blocks
        if self.vace_blocks_to_swap > num_vace_blocks:
            if num_vace_blocks:
                log.warning(
                    "[BlockSwap] vace_blocks_to_swap=%d but the model has %d VACE blocks: swapping all %d",
                    self.vace_blocks_to_swap,
                    num_vace_blocks,
                    num_vace_blocks,
                )
            else:
                log.warning(
                    "[BlockSwap] vace_blocks_to_swap=%d ignored: the model has no VACE blocks",
                    self.vace_blocks_to_swap,
                )
            changes["vace_blocks_to_swap"] = num_vace_blocks
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def overlaps_copies(self) -> bool:
        """Copies can run while blocks compute only with a prefetch depth and pinned, async copies."""
        return self.prefetch_blocks > 0 and self.use_non_blocking

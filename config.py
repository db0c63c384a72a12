"""Node settings, validated once, with errors that name the input and its valid range. No ComfyUI."""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

# Widget ranges. The largest released WAN has 40 blocks; other WAN-architecture models (LongCat) 48.
MAX_BLOCKS = 64
MAX_VACE_BLOCKS = 32
MAX_PREFETCH = 8
# Where swapped blocks wait between runs (host_memory.py; here so the settings module imports no torch).
HOST_MEMORY_CHOICES = ("auto", "ram", "file")


def check_int(name: str, value: object, low: int, high: int | None = None, scope: str = "") -> int:
    """`value` as an int in [low, high] (no upper bound when high is None), or a ValueError naming the
    input and its range. `scope` ends the range ("for this model")."""
    span = f"between {low} and {high}" if high is not None else f"an integer >= {low}"
    scope = f" {scope}" if scope else ""
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer " if high is not None else ""
        raise ValueError(f"{name} must be {kind}{span}{scope} (got {value!r})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {span}{scope} (got {value})")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (got {value!r})")
    return value


def check_choice(name: str, value: object, choices) -> str:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return value


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
    auto_blocks_to_swap: bool = False  # at each load: the fewest blocks that fit ComfyUI's VRAM grant
    host_memory: str = "auto"  # where swapped blocks wait in RAM: "auto", "ram" (slabs) or "file"

    def __post_init__(self):
        check_int("blocks_to_swap", self.blocks_to_swap, 0, MAX_BLOCKS)
        check_int("vace_blocks_to_swap", self.vace_blocks_to_swap, 0, MAX_VACE_BLOCKS)
        check_int("prefetch_blocks", self.prefetch_blocks, 0, MAX_PREFETCH)
        for name in (
            "offload_txt_emb",
            "offload_img_emb",
            "use_non_blocking",
            "block_swap_debug",
            "override_dynamic_vram",
            "auto_blocks_to_swap",
        ):
            check_bool(name, getattr(self, name))
        check_choice("host_memory", self.host_memory, HOST_MEMORY_CHOICES)

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

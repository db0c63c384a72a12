"""A simulated small GPU for host tests on a CPU-only machine.

ComfyUI in CPU mode never runs its low-VRAM machinery: the load device is the CPU, so VRAM state is
DISABLED and `load_models_gpu` loads everything fully. `SimulatedCard` drives ComfyUI's real memory
manager as on a small card instead:

- the load device is `cpu:1`: tensors moved there stay in RAM (torch keeps no CPU device index), but
  ComfyUI's own checks (`device != torch.device("cpu")`, `is_device_cpu`) see another device, so
  `load_models_gpu` runs `free_memory`, computes `lowvram_model_memory`, and `load()` does partial
  loads with cast flags and LowVramPatch; `partially_unload` runs when memory is short;
- the card's free memory is what the test says: its size, less what ComfyUI moved onto the card (kept
  in a ledger, since CPU tensors cannot tell where ComfyUI put them), less the engine's slots while a
  run holds them, less what the test allocates itself (`allocate`, e.g. a VAE decode);
- ComfyUI's inference reserve (about 1 GB) is set by the test, so tiny models need partial loads.

Only models created while the card is active get `cpu:1` as their load device.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import comfy.model_management as mm
import torch

from wan22_blockswap import callbacks
from wan22_blockswap.block_manager import tensor_nbytes

DEVICE = torch.device("cpu", 1)


@dataclasses.dataclass
class SimulatedCard:
    total: int
    inference_reserve: int = 0
    vram_state: str = "NORMAL_VRAM"
    allocated: int = 0  # what the test holds on the card itself
    # (module, parameter or buffer name) -> the device ComfyUI last moved it to
    ledger: dict = dataclasses.field(default_factory=dict)
    moves: list = dataclasses.field(default_factory=list)  # (module, device) per .to() ComfyUI made
    # (module, parameter or buffer name) -> how many times a .to() brought it onto the card from elsewhere
    arrivals: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    # -- what is on the card ------------------------------------------------------------------

    def weights_on_card(self, model=None) -> int:
        """Bytes of weights ComfyUI moved onto the card (of one patcher's model, or of all).

        A tensor the engine re-pointed into a host slab since (a block that joined the swapped set while
        ComfyUI had it on the card) is in host RAM, whatever the ledger of `.to()` moves says."""
        total = 0
        members = {id(m) for m in model.model.modules()} if model is not None else None
        slabs = _host_slabs()
        for (module, name), device in self.ledger.items():
            if device != DEVICE:
                continue
            if members is not None and id(module) not in members:
                continue
            t = module._parameters.get(name, module._buffers.get(name))
            if t is not None and not _in_slab(t, slabs):
                total += tensor_nbytes(t)
        return total

    def slots_on_card(self) -> int:
        total = 0
        for loaded in mm.current_loaded_models:
            patcher = loaded.model
            plan = callbacks.plan_of(patcher) if patcher is not None else None
            if plan is not None:
                total += sum(b.numel() for b in plan.engine.slot_buffers())
        return total

    def used(self) -> int:
        return self.weights_on_card() + self.slots_on_card() + self.allocated

    def free(self) -> int:
        return max(self.total - self.used(), 0)

    @contextlib.contextmanager
    def allocate(self, nbytes: int):
        """Hold `nbytes` of the card (a VAE decode, another node's tensors) after asking ComfyUI for room."""
        mm.free_memory(nbytes, DEVICE)
        self.allocated += nbytes
        try:
            yield
        finally:
            self.allocated -= nbytes

    # -- patching ComfyUI ---------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self):
        card = self
        saved = []

        def patch(obj, name, value):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        real_is_device_cpu = mm.is_device_cpu

        def get_free_memory(dev=None, torch_free_too=False):
            if dev is not None and torch.device(dev) != DEVICE:
                return real_free(dev, torch_free_too)
            free = card.free()
            return (free, free) if torch_free_too else free

        def get_total_memory(dev=None, torch_total_too=False):
            if dev is not None and torch.device(dev) != DEVICE:
                return real_total(dev, torch_total_too)
            return (card.total, card.total) if torch_total_too else card.total

        real_free, real_total = mm.get_free_memory, mm.get_total_memory
        real_to = torch.nn.Module.to

        def recording_to(module, *args, **kwargs):
            out = real_to(module, *args, **kwargs)
            device, *_ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None:
                device = torch.device(device)
                card.moves.append((module, device))
                for sub in module.modules():
                    for name, t in list(sub._parameters.items()) + list(sub._buffers.items()):
                        if t is not None:
                            if device == DEVICE and card.ledger.get((sub, name)) != DEVICE:
                                card.arrivals[(sub, name)] += 1
                            card.ledger[(sub, name)] = device
            return out

        patch(mm, "vram_state", mm.VRAMState[self.vram_state])
        patch(mm, "get_torch_device", lambda: DEVICE)
        patch(
            mm, "is_device_cpu", lambda device: False if _same(device, DEVICE) else real_is_device_cpu(device)
        )
        patch(mm, "get_free_memory", get_free_memory)
        patch(mm, "get_total_memory", get_total_memory)
        patch(mm, "minimum_inference_memory", lambda: card.inference_reserve)
        patch(mm, "extra_reserved_memory", lambda: 0)
        patch(torch.nn.Module, "to", recording_to)
        try:
            yield self
        finally:
            mm.unload_all_models()
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)


def _host_slabs() -> list[tuple[int, int]]:
    """(start, end) of every host slab of the plans that own a module now."""
    import gc

    out = []
    for obj in gc.get_objects():
        if isinstance(obj, callbacks.SwapPlan):
            for unit in obj.engine.units:
                if unit.slab is not None:
                    out.append((unit.slab.data_ptr(), unit.slab.data_ptr() + unit.slab.numel()))
    return out


def _in_slab(t: torch.Tensor, slabs: list[tuple[int, int]]) -> bool:
    from wan22_blockswap.block_manager import _leaves

    return all(any(start <= leaf.data_ptr() < end for start, end in slabs) for leaf in _leaves(t))


def _same(device, other: torch.device) -> bool:
    try:
        return torch.device(device) == other
    except (TypeError, RuntimeError):
        return False


def loaded_weight_memory(patcher) -> int:
    """What ComfyUI believes this model has on the card (its own accounting)."""
    return patcher.model.model_loaded_weight_memory

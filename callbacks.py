"""ComfyUI integration: a patcher class that keeps swapped blocks out of ComfyUI's loader, truthful
memory accounting, and per-run hooks (ON_PRE_RUN attaches the engine, ON_CLEANUP detaches it).

Why a patcher subclass: ComfyUI's `load()` moves every module it lists to the GPU (or, on a full
load, the whole model with `.to()`), which would put swapped blocks in VRAM before our hooks ever
run. The subclass hides swapped modules from `_load_list()`, never lets the parent do a full load,
and reports sizes that count the swap slots instead of the swapped weights, so `load_models_gpu`,
`free_memory` and `partially_unload` keep working with true numbers.

Why per-run hooks: the nn.Module is shared by every clone of a patcher. Hooks installed at node time
would fire for an unswapped clone too. ON_PRE_RUN fires after ComfyUI placed the weights, ON_CLEANUP
in the sampler's `finally`, also after an exception or an interrupt.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import weakref

import comfy.model_patcher
import comfy.patcher_extension
import torch

from .block_manager import BlockSwapEngine, tensor_nbytes
from .config import SwapConfig
from .host_memory import at_home, capped_pinned_budget, total_ram
from .quant.reader import is_gguf_weight
from .utils import format_bytes
from .wan.units import WanSwapSelection, auto_wan_selection, select_wan_units

log = logging.getLogger(__name__)

ATTACHMENT_KEY = "wan22_blockswap"
CALLBACK_KEY = "wan22_blockswap"
# Diffusion module -> the plan whose slabs its swapped tensors live in. Clones share the module, and the
# BlockSwap nodes of different clones (LoRA variants, other settings) make different plans for it: one
# owns it at a time. Weak both ways, so neither a module nor a plan is kept alive by this table.
_MODULE_OWNERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[SwapPlan]] = (
    weakref.WeakKeyDictionary()
)


# Diffusion module -> the combined loader's held-back copies (loader.HeldBackCopies) not made yet: its resident
# weights, read from the file into their parameters where ComfyUI's first load of the module puts them.
_UNFILLED: weakref.WeakKeyDictionary[torch.nn.Module, object] = weakref.WeakKeyDictionary()


def fill_at_first_load(module: torch.nn.Module, copies) -> None:
    """`copies` (sources(), owner(key), drop(keys), complete(only=..., on_copy=...)) are made at the first load
    of `module` by a BlockSwap patcher, or before anything else reads its weights through one."""
    if copies.pending:
        _UNFILLED[module] = copies


def fill_held_back(module: torch.nn.Module, only=None, progress: bool = False) -> None:
    """Make `module`'s held-back copies (those in `only`, or all) into its parameters where they lie now."""
    copies = _UNFILLED.get(module)
    if copies is None:
        return
    count = len(copies.pending) if only is None else len(copies.pending.keys() & only)
    on_copy = None
    if progress and count:
        import comfy.utils

        bar = comfy.utils.ProgressBar(count)
        on_copy = lambda _dst: bar.update(1)  # noqa: E731
    if count:
        copies.complete(only=only, on_copy=on_copy)
    if not copies.pending:
        _UNFILLED.pop(module, None)


def owner_plan(module: torch.nn.Module) -> SwapPlan | None:
    """The plan that owns `module`'s swapped tensors now, if any."""
    ref = _MODULE_OWNERS.get(module)
    return ref() if ref is not None else None


def is_dynamic(patcher) -> bool:
    """ComfyUI 0.16+ dynamic VRAM: the patcher already streams weights per layer on demand."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(callable(check) and check())


class SwapPlan:
    """One BlockSwap node's decision for one model, shared by all clones of the node's output.

    Owns the engine (and through it the host slabs). Created at node time; slabs are built at the
    first load, slots and hooks exist only during sampling runs.
    """

    def __init__(
        self,
        diffusion_model: torch.nn.Module,
        config: SwapConfig,
        choice: WanSwapSelection,
        load_device: torch.device,
    ):
        self.config = config
        self.diffusion_model = diffusion_model
        # Host slabs live in CPU RAM whatever ComfyUI's offload device is: with --highvram/--gpu-only it is
        # the GPU, and "swapped" blocks there would save nothing.
        self.engine = BlockSwapEngine(
            choice.units,
            choice.swap,
            compute_device=load_device,
            offload_device="cpu",
            prefetch_blocks=config.prefetch_blocks,
            use_non_blocking=config.use_non_blocking,
            pinned_budget_bytes=pinned_budget,
            debug=config.block_swap_debug,
            placement="host",  # ComfyUI's own load() places resident blocks; slabs are home between runs
            on_slab_built=_SlabProgress(),
            reader_streams=_comfy_offload_streams(load_device),
            host_memory=config.host_memory,
        )
        self._refresh_swap_set()
        # auto_blocks_to_swap: the swap set is chosen at each load from ComfyUI's grant (see `replan`).
        self.auto = config.auto_blocks_to_swap
        self._auto_candidates = choice.candidates if self.auto else []
        self._auto_count: int | None = None  # blocks swapped by the current auto plan (None: none made)
        self._auto_budget = 0.0  # the grant when the swapped set last changed
        self._auto_fit = None
        self.last_grant: float | None = None  # the VRAM ComfyUI granted at the last load (auto)
        self._auto_report = False  # log the plan and its measured cost after the next run
        self._patcher_ref = None  # the patcher whose run is active / last loaded (for LoRA patches)
        self._functions_set: list[tuple[torch.nn.Module, str]] = []
        self._logged_plan = False

    def _refresh_swap_set(self) -> None:
        """What ComfyUI's side needs to know of the swapped units (hidden modules, weight keys, sizes)."""
        swapped = self.engine.swapped_units
        self.swapped_module_ids = {id(m) for unit in swapped for m in unit.module.modules()}
        self.swapped_layers = [m for unit in swapped for m in unit.module.modules()]
        # ComfyUI's weight key of every swapped tensor -> (owning module, attribute name).
        self.keyed_tensors: dict[str, tuple[torch.nn.Module, str]] = {}
        for unit in swapped:
            for name, module in unit.module.named_modules():
                prefix = f"diffusion_model.{unit.name}.{name + '.' if name else ''}"
                for attr, _ in module.named_parameters(recurse=False):
                    self.keyed_tensors[prefix + attr] = (module, attr)
        self.swapped_bytes = self.engine.swapped_bytes()
        self.slot_bytes = self.engine.slot_bytes()

    # -- auto_blocks_to_swap -------------------------------------------------------------------

    def replan(self, budget: float, model_bytes: int) -> bool:
        """Swap the fewest tail blocks (with their share of VACE blocks) whose resident weights and slots
        fit `budget`, the VRAM ComfyUI grants this model now (`model_bytes`: its whole size). More blocks
        join at once; blocks leave only when the grant grew by two blocks since the last change, so a
        grant that wobbles between runs does not move weights back and forth. True if the set changed."""
        from .block_manager import fewest_swapped_for_budget

        sizes = self.engine.unit_bytes()
        fit = fewest_swapped_for_budget(
            self._auto_candidates, sizes, model_bytes, self.config.prefetch_blocks + 1, budget
        )
        block = max(sizes[u.name] for u in self.engine.units if u.name.startswith("blocks."))
        current = self._auto_count
        grown = budget >= self._auto_budget + 2 * block
        count = fit.count if current is None or fit.count > current or grown else current
        if not fit.fits and (self._auto_fit is None or self._auto_fit.fits or count != current):
            log.warning(
                "[BlockSwap] auto: ComfyUI grants this model %s of VRAM, but even with all %d blocks swapped "
                "its other weights (%s) and the slots (%s) need %s: ComfyUI offloads the rest layer by layer. "
                "Free VRAM (smaller frames or resolution, other models unloaded) or use fewer prefetch_blocks.",
                format_bytes(budget),
                len(self.diffusion_model.blocks),
                format_bytes(fit.resident_bytes),
                format_bytes(fit.slot_bytes),
                format_bytes(fit.device_bytes),
            )
        self._auto_fit, self.last_grant = fit, budget
        if count == current:
            return False
        self.engine.set_swapped(self._auto_candidates[count])
        self._refresh_swap_set()
        self._auto_count, self._auto_budget = count, budget
        self._auto_report = True
        self.engine.time_next_run = True
        log.info(
            "[BlockSwap] auto: %d of %d blocks swapped%s (ComfyUI grants %s; resident %s + slots %s)",
            count,
            len(self.diffusion_model.blocks),
            "" if current is None else f" (was {current})",
            "the whole model" if budget == float("inf") else format_bytes(budget),
            format_bytes(model_bytes - self.swapped_bytes),
            format_bytes(self.slot_bytes),
        )
        return True

    def plan_from_free_vram(self, patcher) -> None:
        """Before ComfyUI's first load (the combined loader, at read time): fit the plan to the VRAM free
        now, less ComfyUI's inference reserve, for the model's whole size. The first load corrects it."""
        import comfy.model_management as mm

        device = patcher.load_device
        if mm.is_device_cpu(device):
            grant = float("inf")  # CPU mode: ComfyUI loads everything
        else:
            reserve = mm.minimum_inference_memory() + mm.extra_reserved_memory()
            grant = max(mm.get_free_memory(device) - reserve, 0.1)
        self.replan(grant, patcher.model_size())

    def _report_auto_run(self) -> None:
        """After the first run of an auto plan: the plan and what its copies cost against compute."""
        self._auto_report = False
        stats, blocks = self.engine.last_run, len(self.diffusion_model.blocks)
        budget = self._auto_budget
        fit = "the whole model" if budget == float("inf") else format_bytes(budget)
        head = f"[BlockSwap] auto: {self._auto_count} of {blocks} blocks swapped to fit {fit}"
        if not self.engine.order:
            log.info("%s; nothing streamed, no hooks", head)
        elif stats is None or not stats.copies or not stats.computes:
            log.info("%s; no copy/compute timing (CUDA events only)", head)
        else:
            copy, compute = stats.copy_ms / stats.copies, stats.compute_ms / stats.computes
            passes = max(self.engine.counters.passes, 1)
            verdict = (
                "copies hidden"
                if copy <= compute and self.config.overlaps_copies
                else f"copies not hidden: compute waited {stats.stall_ms / passes:.1f} ms per pass"
            )
            log.info("%s; copy %.1f ms/block vs compute %.1f ms/block -> %s", head, copy, compute, verdict)

    # -- ownership of the shared module ------------------------------------------------------

    def take_module(self) -> None:
        """Hand the shared module over to this plan: slabs of blocks both plans swap pass to this plan (a
        LoRA or strength change never copies the model again), the previous owner gives up the rest (the
        tensors keep their memory), and this plan's slabs become the swapped tensors' home."""
        owner = owner_plan(self.diffusion_model)
        if owner is not None and owner is not self:
            owner.end_run()
            self.engine.adopt_slabs(owner.engine)
            owner.engine.forget_slabs()
        _MODULE_OWNERS[self.diffusion_model] = weakref.ref(self)

    def build_host_copies(self, sources: dict[int, torch.Tensor], on_slab_built=None) -> None:
        """At load time (the combined loader): take the module and build every swapped unit's slab now,
        reading the tensors listed in `sources` (id -> file tensor) from there instead of from the
        never-filled parameters."""
        self.take_module()
        previous = self.engine.on_slab_built
        if on_slab_built is not None:
            self.engine.on_slab_built = on_slab_built
        try:
            self.engine.park(sources)
        finally:
            self.engine.on_slab_built = previous

    def modules_in_slabs(self) -> list[torch.nn.Module]:
        """Every module of the swapped units whose tensors all lie at their host home now: the slab, or the
        file a unit was left in (a unit that another patcher moved out of it, e.g. an unswapped clone's full
        load, is not listed)."""
        return [m for unit in self.engine.swapped_units if at_home(unit) for m in unit.module.modules()]

    def prepare_load(self, patcher) -> None:
        """Called by the patcher's load(): swapped units go (or stay) in host RAM, never to the GPU."""
        self._patcher_ref = weakref.ref(patcher)
        pinned = getattr(patcher, "pinned", None)
        if pinned:
            # ComfyUI (0.3.69+) pins offloaded weights in place and unpins them by key later; a weight
            # we are about to re-home must be unpinned by ComfyUI first, or it warns at unpin time.
            for key in self.keyed_tensors.keys() & set(pinned):
                patcher.unpin_weight(key)
        self._restore_original_weights(patcher)
        _drop_dynamic_state(self.diffusion_model)
        self.take_module()
        # Units that joined since the combined loader read the file (auto) are read from it into their slabs too.
        unfilled = _UNFILLED.get(self.diffusion_model)
        self.engine.park(unfilled.sources() if unfilled is not None else None)
        if unfilled is not None:
            unfilled.drop([id(t) for unit in self.engine.swapped_units for *_, t in unit.tensors()])
            if not unfilled.pending:
                _UNFILLED.pop(self.diffusion_model, None)

    def _restore_original_weights(self, patcher) -> None:
        """Swapped weights that a ComfyUI load fused a LoRA into go back to their originals first.

        The slabs must hold pristine weights: every clone shares them, and this plan applies LoRA
        per run. ComfyUI keeps the originals in the patcher's `backup` (shared by clones) until it
        unpatches; we restore just the swapped keys, the same way it does.
        """
        import comfy.utils

        backup = getattr(patcher, "backup", None)
        for key in self.keyed_tensors.keys() & set(backup or ()):
            saved = backup.pop(key)
            if saved.inplace_update:
                comfy.utils.copy_to_param(patcher.model, key, saved.weight)
            else:
                comfy.utils.set_attr_param(patcher.model, key, saved.weight)

    # -- runs ----------------------------------------------------------------------------------

    def begin_run(self, patcher) -> None:
        if self.engine.is_attached:
            return
        self._patcher_ref = weakref.ref(patcher)
        self.take_module()
        fill_held_back(self.diffusion_model)  # a run without ComfyUI's load (no-op after it)
        self._install_lora(patcher)
        if self.config.block_swap_debug and not self._logged_plan:
            self._logged_plan = True
            if any(is_gguf_weight(t) for unit in self.engine.swapped_units for *_, t in unit.tensors()):
                log.info("[BlockSwap] GGUF model detected: swapped blocks move as quantized bytes")
        try:
            self.engine.attach()
        except BaseException:
            self._remove_lora()
            raise

    def end_run(self) -> None:
        ran = self.engine.is_attached
        try:
            self.engine.detach()
        finally:
            self._remove_lora()
        if ran and self._auto_report:
            self._report_auto_run()

    # -- LoRA on swapped units -----------------------------------------------------------------
    # ComfyUI fuses LoRA into the weights it loads and applies it per forward (LowVramPatch) to the
    # layers it offloads. Swapped layers are hidden from it, so we attach the same per-forward
    # patch functions for the run; the slabs stay pristine for every other clone. Like ComfyUI, we
    # leave patches on parameters of non-leaf modules (a block's modulation) unapplied: its loader
    # never applies them either, so outputs match the unswapped model.

    def _install_lora(self, patcher) -> None:
        patches = patcher.patches
        wrappers = getattr(patcher, "weight_wrapper_patches", None) or {}
        for key, (module, attr) in self.keyed_tensors.items():
            if key not in patches and key not in wrappers:
                continue
            tensor = getattr(module, attr)
            if is_gguf_weight(tensor):
                if key in patches:
                    tensor.patches = [(patches[key], key)]  # GGUF layers apply these after dequantizing
                    self._functions_set.append((module, attr))
            elif attr in ("weight", "bias") and hasattr(module, f"{attr}_function"):
                functions = [_lowvram_patch(patcher, key)] if key in patches else []
                functions += list(wrappers.get(key, ()))  # as ComfyUI's load() extends its own layers
                setattr(module, f"{attr}_function", functions)
                self._functions_set.append((module, attr))

    def apply_cast_flags(self, patcher) -> None:
        """The cast flags ComfyUI's load() sets on the layers it lists, set on the swapped ones it never
        sees: `comfy_force_cast_weights` (0.8.1+), and `comfy_cast_weights` when the model must cast
        (ModelComputeDtype, force_cast_weights), keeping the previous value where ComfyUI keeps it, so
        its own unpatching restores both."""
        force = bool(getattr(patcher, "force_cast_weights", False))
        for module in self.swapped_layers:
            if not hasattr(module, "comfy_cast_weights"):
                continue
            module.comfy_force_cast_weights = force
            if force and not hasattr(module, "prev_comfy_cast_weights"):
                module.prev_comfy_cast_weights = module.comfy_cast_weights
                module.comfy_cast_weights = True

    def _remove_lora(self) -> None:
        for module, attr in self._functions_set:
            tensor = getattr(module, attr)
            if is_gguf_weight(tensor):
                tensor.patches = []
            else:
                setattr(module, f"{attr}_function", [])
        self._functions_set = []


def _lowvram_patch(patcher, key: str):
    """ComfyUI's per-forward LoRA patch for `key`, built as its own lowvram path builds it: with the
    layer's convert/set functions (scaled fp8 layers rescale through them), where the host has them."""
    get_key_weight = getattr(comfy.model_patcher, "get_key_weight", None)
    if get_key_weight is None:
        return comfy.model_patcher.LowVramPatch(key, patcher.patches)
    _weight, set_func, convert_func = get_key_weight(patcher.model, key)
    return comfy.model_patcher.LowVramPatch(key, patcher.patches, convert_func, set_func)


def pinned_budget() -> int:
    """What this pack may page-lock now: ComfyUI's own pinned-memory limit (0.3.69+) where it has one,
    never more than 45 % of the RAM (40 % on Windows; ComfyUI's Linux limit is up to 95 %), less what
    ComfyUI has pinned itself: both pin against one limit, so the machine keeps the rest."""
    import comfy.model_management as mm

    limit = getattr(mm, "MAX_PINNED_MEMORY", None)  # absent before 0.3.69; -1 when pinning is off
    if not isinstance(limit, (int, float)):
        limit = None
    return capped_pinned_budget(limit, getattr(mm, "TOTAL_PINNED_MEMORY", 0), total_ram())


class _SlabProgress:
    """ComfyUI's progress bar over the host slabs being built (the first load of a large model)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        import comfy.utils

        if done == 1 or self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def _comfy_offload_streams(device: torch.device):
    """ComfyUI's own offload streams for `device` (0.3.64+ with --async-offload; on by default from
    0.3.76): it casts weights on them, so they must wait for a slot's copy like the compute stream."""
    import comfy.model_management as mm

    def streams():
        table = getattr(mm, "STREAMS", None)
        if not isinstance(table, dict):
            return ()
        if device not in table and getattr(mm, "NUM_STREAMS", 1) > 1:
            mm.get_offload_stream(device)  # created lazily at the first cast: create them now
        return table.get(device, ())

    return streams


@contextlib.contextmanager
def kept_out_of_moves(modules: list[torch.nn.Module]):
    """While active, `Module.to()` / `_apply` of any ancestor skips these modules' own parameters and buffers
    (their tables are empty for the duration), so ComfyUI's `model.to(device)` moves everything else.

    Nothing but the move may run inside: a parameter set on a hidden module meanwhile would be lost."""
    saved = [(m, m.__dict__["_parameters"], m.__dict__["_buffers"]) for m in modules]
    try:
        for m, _, _ in saved:
            m.__dict__["_parameters"], m.__dict__["_buffers"] = {}, {}
        yield
    finally:
        for m, params, buffers in saved:
            m.__dict__["_parameters"], m.__dict__["_buffers"] = params, buffers


@contextlib.contextmanager
def slabs_kept_out_of_moves(model: torch.nn.Module, plan: SwapPlan):
    """While active, `model.to()` (ComfyUI's move of its whole model) leaves the swapped units that lie in their
    host slabs where they are; everything else it does (restoring fused weights, unpinning) sees the model
    whole. Only that one call is affected: an attribute on this model object, removed afterwards."""
    move, previous = model.to, model.__dict__.get("to")

    def to(*args, **kwargs):
        with kept_out_of_moves(plan.modules_in_slabs()):
            return move(*args, **kwargs)

    model.__dict__["to"] = to
    try:
        yield
    finally:
        if previous is None:
            model.__dict__.pop("to", None)
        else:
            model.__dict__["to"] = previous


def plan_of(patcher) -> SwapPlan | None:
    attachments = getattr(patcher, "attachments", None) or {}
    return attachments.get(ATTACHMENT_KEY)


class BlockSwapPatcherMixin:
    """Mixed in front of ComfyUI's ModelPatcher (or ComfyUI-GGUF's GGUFModelPatcher)."""

    def clone(self, *args, **kwargs):
        n = super().clone(*args, **kwargs)
        # ComfyUI-GGUF's clone() forces its own class; keep ours. ComfyUI passes model_size() (our
        # reduced figure) into the clone: restore the raw size our model_size() starts from.
        n.__class__ = self.__class__
        if getattr(self, "size", 0) and getattr(n, "size", 0):
            n.size = self.size
        return n

    def model_size(self):
        size = super().model_size()
        plan = plan_of(self)
        if plan is None or plan.auto:
            return size  # auto: ComfyUI's grant must be computed for the whole model
        return size - plan.swapped_bytes + plan.slot_bytes

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        """ComfyUI's (re)load of a model it may already hold, with `extra_memory` more than it has now.

        auto_blocks_to_swap: the plan is fitted to the new grant first. When that changes the swapped set of
        a model ComfyUI has loaded, the model is marked as holding other weights than this patcher's, so
        ComfyUI's own partially_load unloads what it placed and loads again through `load()`: blocks that
        join leave the GPU, blocks that leave are placed, and ComfyUI counts everything anew. (The mark is
        on the shared model, not on this patcher: its clones keep matching the model once it reloaded.)
        """
        plan = plan_of(self)
        if plan is not None and plan.auto and not plan.engine.is_attached:
            used = self.model.model_loaded_weight_memory
            grant = float("inf") if extra_memory >= 1e31 else used + extra_memory
            changed = plan.replan(grant, super().model_size())
            if changed and getattr(self.model, "current_weight_patches_uuid", None) is not None:
                self.model.current_weight_patches_uuid = uuid.uuid4()
        return super().partially_load(device_to, extra_memory, force_patch_weights=force_patch_weights)

    def unpatch_model(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        """ComfyUI's unpatch ends with `model.to(device_to)`, its offload device: the GPU itself with --highvram /
        --gpu-only (and ComfyUI then counts 0 loaded). Every unload takes this path (`unload_all_models`, the
        free_memory before a VAE decode, a looper turn, the reload after an auto re-plan). The swapped units in
        their host slabs are kept out of that move, so they never reach the device; the rest moves as ComfyUI
        moves it."""
        module = getattr(getattr(self, "model", None), "diffusion_model", None)
        plan = (
            owner_plan(module) if module is not None and unpatch_weights and device_to is not None else None
        )
        if plan is None:
            return super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)
        with slabs_kept_out_of_moves(self.model, plan):
            return super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)

    def _load_list(self, *args, **kwargs):
        entries = super()._load_list(*args, **kwargs)
        plan = plan_of(self)
        if plan is None:
            return entries
        # Entry layout changed across versions, but the module is always second to last.
        return [e for e in entries if id(e[-2]) not in plan.swapped_module_ids]

    def load(
        self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs
    ):
        plan = plan_of(self)
        if plan is None:
            return super().load(
                device_to,
                lowvram_model_memory=lowvram_model_memory,
                force_patch_weights=force_patch_weights,
                full_load=full_load,
                **kwargs,
            )
        if plan.auto and not plan.engine.is_attached:
            whole = full_load or lowvram_model_memory == 0
            plan.replan(float("inf") if whole else lowvram_model_memory, super().model_size())
        plan.prepare_load(self)
        if plan.diffusion_model in _UNFILLED:
            # Weights ComfyUI reads while it loads (it fuses patches into them) are filled first, in host RAM;
            # the rest after it placed them, where they lie.
            fill_held_back(plan.diffusion_model, only=self._read_while_loading(), progress=True)
        if full_load or lowvram_model_memory == 0:
            budget = 1e32  # "load everything" - of what the load list still holds
        else:
            budget = max(lowvram_model_memory - plan.slot_bytes, 0.1)
        if hasattr(self, "mmap_released"):
            # ComfyUI-GGUF's first lowvram load bounces every CPU module through the GPU to copy it out
            # of the file mapping. Swapped units were already copied into our slabs by park().
            self.mmap_released = True
        # full_load=False: the parent's full load ends with model.to(device), which would move the
        # swapped blocks to the GPU.
        # Keywords, not positions: ComfyUI-GGUF's load(*args, force_patch_weights=..., **kwargs) reads them.
        result = super().load(
            device_to,
            lowvram_model_memory=budget,
            force_patch_weights=force_patch_weights,
            full_load=False,
            **kwargs,
        )
        # ComfyUI's loaded-memory figure stays what it counted: the resident weights it moved (and those placed
        # below). The slots exist only during a run; room for them was kept by loading `slot_bytes` less than
        # granted.
        if device_to is not None:
            self.model.model_loaded_weight_memory += self._place_unlisted(plan, device_to)
        fill_held_back(plan.diffusion_model, progress=True)
        plan.apply_cast_flags(self)
        return result

    def _read_while_loading(self) -> set[int]:
        """Held-back parameters whose value ComfyUI's load reads: those it patches (LoRA, merges), or every one
        while weight hooks are set (it applies them at the end of its load)."""
        copies = _UNFILLED[self.model.diffusion_model]
        if getattr(self, "hook_patches", None):
            return set(copies.pending)
        paths = {id(m): name for name, m in self.model.named_modules()}
        read = set()
        for key in copies.pending:
            owner = copies.owner(key)
            if owner is not None and f"{paths.get(id(owner[0]))}.{owner[1]}" in self.patches:
                read.add(key)
        return read

    # Both hand out the weights themselves (model merging, saving): held-back ones are filled first.

    def get_key_patches(self, *args, **kwargs):
        fill_held_back(self.model.diffusion_model)
        return super().get_key_patches(*args, **kwargs)

    def model_state_dict(self, *args, **kwargs):
        fill_held_back(self.model.diffusion_model)
        return super().model_state_dict(*args, **kwargs)

    def _place_unlisted(self, plan: SwapPlan, device_to) -> int:
        """Move the resident weights ComfyUI's load never lists to `device_to`; returns their bytes.

        Its `_load_list` holds leaf modules only, so a parameter of a module with children (each block's
        `modulation`, `head.modulation`, `img_emb.emb_pos`) moves only in its full load (`model.to`), which this
        patcher never lets it make: WAN's forward would copy each from host RAM, with a host sync, in every call.
        They move here as that full load would move them (swapped units and listed modules kept out of it), also
        when ComfyUI offloads some layers (a few kB per block), and are counted as loaded; ComfyUI's unpatch
        moves them back with the rest and resets the count.
        """
        diffusion_model = self.model.diffusion_model
        listed = {id(entry[-2]) for entry in self._load_list()}
        others, targets, nbytes = [], [], 0
        for module in diffusion_model.modules():
            own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if own and id(module) not in listed and id(module) not in plan.swapped_module_ids:
                targets.append(module)
                nbytes += sum(tensor_nbytes(t) for t in own)
            else:
                others.append(module)
        if targets:
            with kept_out_of_moves(others):
                diffusion_model.to(device_to)
        return nbytes


_PATCHER_CLASSES: dict[type, type] = {}


def swap_patcher_class(base: type) -> type:
    if issubclass(base, BlockSwapPatcherMixin):
        return base
    cls = _PATCHER_CLASSES.get(base)
    if cls is None:
        cls = type(f"BlockSwap{base.__name__}", (BlockSwapPatcherMixin, base), {})
        _PATCHER_CLASSES[base] = cls
    return cls


# -- callbacks (module-level functions: clones copy them by reference) -------------------------


def _on_pre_run(patcher) -> None:
    plan = plan_of(patcher)
    if plan is not None:
        plan.begin_run(patcher)


def _on_cleanup(patcher) -> None:
    plan = plan_of(patcher)
    if plan is not None:
        plan.end_run()


def _diffusion_model_wrapper(executor, *args, **kwargs):
    """Safety net for callers that run the model without ComfyUI's sampler (no ON_PRE_RUN)."""
    module = executor.class_obj
    plan = owner_plan(module) if isinstance(module, torch.nn.Module) else None
    if plan is None or plan.engine.is_attached or plan._patcher_ref is None or plan._patcher_ref() is None:
        return executor(*args, **kwargs)
    plan.begin_run(plan._patcher_ref())
    try:
        return executor(*args, **kwargs)
    finally:
        plan.end_run()


def _without_dynamic_vram(model):
    """A classic ModelPatcher over the same diffusion module as the dynamic-VRAM `model`.

    `clone(disable_dynamic=True)` alone rebuilds the model from its file (the loader's reload function)
    while the dynamic one stays cached: the weights twice in RAM, and an error for loaders without a
    reload function. Handing the clone this model's own module (`model_override`) copies nothing.
    """
    override = getattr(model, "get_clone_model_override", None)
    if override is None:  # a host without the override API: its own (reloading) path
        return model.clone(disable_dynamic=True)
    return model.clone(disable_dynamic=True, model_override=override())


def _drop_dynamic_state(diffusion_model: torch.nn.Module) -> None:
    """Release what dynamic VRAM attached to layers it loaded before (`_v`: a region of its virtual
    VRAM buffer); ComfyUI's layers take the dynamic path while it is there. Dynamic VRAM allocates it
    again when it loads the module itself."""
    layers = [m for m in diffusion_model.modules() if hasattr(m, "_v")]
    if not layers:
        return
    import comfy_aimdo.model_vbar

    for m in layers:
        comfy_aimdo.model_vbar.vbar_unpin(m._v)
        delattr(m, "_v")


def apply_block_swap(model, config: SwapConfig, shared_plans: dict | None = None):
    """The node's work: a clone of `model` that streams the configured blocks. `model` is unchanged.

    shared_plans: diffusion module -> plan, for nodes that swap several models at once (the looper
    nodes): models that share a module (LoRA clones of one model) share one plan and its host copies.
    """
    from .wan.units import is_wan_model, vace_blocks

    if is_dynamic(model):
        if not config.override_dynamic_vram:
            log.info(
                "[BlockSwap] This ComfyUI streams weights itself (dynamic VRAM): leaving the model to it. "
                "Set override_dynamic_vram to use block swapping instead."
            )
            return model
        model = _without_dynamic_vram(model)
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not is_wan_model(diffusion_model):
        got = type(diffusion_model).__name__ if diffusion_model is not None else type(model).__name__
        raise ValueError(
            f"WAN 2.2 BlockSwap needs a WAN 2.1/2.2 diffusion model (WanModel and its VACE, camera, S2V, "
            f"HuMo, Animate variants); got {got}"
        )
    plan = shared_plans.get(diffusion_model) if shared_plans is not None else None
    if plan is None:
        vace = vace_blocks(diffusion_model)
        config = config.fitted_to(len(diffusion_model.blocks), len(vace) if vace is not None else 0)
        if config.auto_blocks_to_swap:
            choice = auto_wan_selection(diffusion_model, config.offload_txt_emb, config.offload_img_emb)
        else:
            choice = select_wan_units(
                diffusion_model,
                config.blocks_to_swap,
                config.vace_blocks_to_swap,
                config.offload_txt_emb,
                config.offload_img_emb,
            )
        plan = SwapPlan(diffusion_model, config, choice, model.load_device)
        if shared_plans is not None:
            shared_plans[diffusion_model] = plan
        _log_setup(plan, config)
        if torch.device(model.offload_device).type != "cpu":
            log.info(
                "[BlockSwap] ComfyUI's offload device is %s (--highvram / --gpu-only): it would keep the whole "
                "model in VRAM. The %d swapped blocks are kept in CPU RAM as asked.",
                model.offload_device,
                config.blocks_to_swap,
            )
    patched = model.clone()
    patched.__class__ = swap_patcher_class(type(model))
    patched.size = getattr(model, "size", 0)
    # A weight-patch identity of its own: when the shared module was last loaded by another clone
    # (fully, LoRA fused, swapped blocks on the GPU), ComfyUI then unpatches and reloads it through
    # our load() instead of reusing that state.
    patched.patches_uuid = uuid.uuid4()
    patched.set_attachments(ATTACHMENT_KEY, plan)
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, CALLBACK_KEY, _on_pre_run)
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, CALLBACK_KEY, _on_cleanup)
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CALLBACK_KEY, _diffusion_model_wrapper
    )
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CALLBACK_KEY, _take_turn)
    return patched


# -- experts that take turns (WAN 2.2 high/low, the looper nodes) -------------------------------


# Diffusion module -> the modules it takes turns with in VRAM (WAN 2.2 high <-> low). Kept per module, not
# per plan, so a pair linked by one node (Looper Models) stays linked for the LoRA clones another node
# (Sequencer) makes of the same experts.
_RIVALS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def make_rivals(first: list[SwapPlan], second: list[SwapPlan]) -> None:
    """Models of `first` and of `second` never hold resident VRAM at the same time: before one samples,
    the other's resident weights leave the device (see `_take_turn`), so each may use the whole grant."""
    for a in first:
        for b in second:
            if a.diffusion_model is not b.diffusion_model:
                _RIVALS.setdefault(a.diffusion_model, weakref.WeakSet()).add(b.diffusion_model)
                _RIVALS.setdefault(b.diffusion_model, weakref.WeakSet()).add(a.diffusion_model)


def rivals_of(plan: SwapPlan) -> set:
    return set(_RIVALS.get(plan.diffusion_model, ()))


def unload_rivals(plan: SwapPlan) -> int:
    """Unload, through ComfyUI's own loaded-model list, every loaded model whose diffusion module takes
    turns with `plan`'s. Returns how many were unloaded."""
    import comfy.model_management as mm

    rivals = rivals_of(plan)
    unloaded = 0
    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model
        module = getattr(getattr(patcher, "model", None), "diffusion_model", None)
        if module is not None and any(module is r for r in rivals) and loaded.model_unload():
            mm.current_loaded_models.remove(loaded)
            unloaded += 1
    return unloaded


def _take_turn(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: runs before ComfyUI computes this model's VRAM grant and loads it."""
    plan = plan_of(getattr(executor.class_obj, "model_patcher", None))
    if plan is not None and plan.diffusion_model in _RIVALS:
        n = unload_rivals(plan)
        if n:
            log.debug("[BlockSwap] %d rival expert(s) unloaded before this one samples", n)
    return executor(*args, **kwargs)


def _log_setup(plan: SwapPlan, config: SwapConfig) -> None:
    engine = plan.engine
    if plan.auto:
        log.info(
            "[BlockSwap] auto_blocks_to_swap: the swapped blocks (of %d) are chosen at each load from the VRAM "
            "ComfyUI grants; blocks_to_swap=%d and vace_blocks_to_swap=%d are not used; prefetch %d",
            len(plan.diffusion_model.blocks),
            config.blocks_to_swap,
            config.vace_blocks_to_swap,
            config.prefetch_blocks,
        )
        return
    log.info(
        "[BlockSwap] %d of %d blocks swapped (%s in CPU RAM), %d slot(s) of VRAM (%s), prefetch %d",
        config.blocks_to_swap,
        len(plan.diffusion_model.blocks),
        format_bytes(plan.swapped_bytes),
        engine.num_slots(),
        format_bytes(plan.slot_bytes),
        config.prefetch_blocks,
    )
    if plan.swapped_bytes and not config.overlaps_copies and engine.compute_device.type == "cuda":
        log.info(
            "[BlockSwap] prefetch_blocks=%d, use_non_blocking=%s: copies wait for compute. "
            "prefetch_blocks=1 with use_non_blocking=True overlaps them (uses pinned RAM).",
            config.prefetch_blocks,
            config.use_non_blocking,
        )

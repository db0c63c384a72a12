"""WAN diffusion model loading for the WAN Model Loader node (imports ComfyUI).

- Files come from ComfyUI's ``diffusion_models`` folders (which include the legacy ``unet`` folder). GGUF
  files are listed through a folder key of our own that shares those folders' path list, so ComfyUI's
  extension sets (one set object shared by most folders) are never touched.
- Every file is checked before anything is built: the name must stay inside the model folders, the file
  must be complete, and its weights must be a WAN 2.1/2.2 model that fits the chosen version and variant
  (:mod:`wan.detect`).
- Safetensors load through ``comfy.sd.load_diffusion_model`` with the options UNETLoader uses, so the model
  is the one "Load Diffusion Model" gives; only an explicit compute dtype is set on top of it.
- GGUF files are memory-mapped (:func:`quant.reader.load_gguf_state_dict`); quantized weights stay raw bytes
  (:class:`GGUFWeight`) and :mod:`quant.ops` layers decode them on the compute device. LoRA on them is kept
  on ``weight.patches`` by :class:`WanGGUFModelPatcher` instead of being fused.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import time

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths
import safetensors
import torch
from torch.overrides import TorchFunctionMode

from .config import SwapConfig, check_choice
from .quant.ops import GGUFOps, load_progress
from .quant.reader import is_gguf_weight, load_gguf_state_dict
from .utils import FLOAT_DTYPES, FP8_DTYPES, format_bytes
from .wan.detect import ResolvedWanType, detect_wan, logical_shapes, resolve_choice

log = logging.getLogger(__name__)

MODEL_TYPES = ("safetensors", "gguf")
FP8_OPTIMIZATIONS = ("disabled", *FP8_DTYPES)
WEIGHT_DTYPES = ("auto", *FLOAT_DTYPES)

EXTENSIONS = {"safetensors": (".safetensors", ".sft"), "gguf": (".gguf",)}

DIFFUSION_FOLDER = "diffusion_models"
GGUF_FOLDER = "wan22_blockswap_diffusion_models_gguf"
NO_MODEL = "none"  # listed when a folder holds no file of a kind, so the node still validates


# --------------------------------------------------------------------------------------------
# Folders and file names
# --------------------------------------------------------------------------------------------


def _diffusion_folder_key() -> str:
    table = folder_paths.folder_names_and_paths
    for key in (DIFFUSION_FOLDER, "unet"):  # "unet" is the pre-2024 name of the same folder
        if key in table:
            return key
    raise RuntimeError("ComfyUI has no diffusion_models (unet) model folder registered")


def register_gguf_folder() -> str:
    """Register (or refresh) our GGUF folder key and return it.

    It shares the diffusion_models entry's path list object, so folders added to diffusion_models later
    (extra_model_paths.yaml, add_model_folder_path) are searched too, and has an extension set of its own:
    adding ".gguf" to diffusion_models' set would add it to every folder sharing ComfyUI's set.
    """
    table = folder_paths.folder_names_and_paths
    paths = table[_diffusion_folder_key()][0]
    current = table.get(GGUF_FOLDER)
    if current is None or current[0] is not paths:
        table[GGUF_FOLDER] = (paths, set(EXTENSIONS["gguf"]))
    return GGUF_FOLDER


def list_safetensors_models() -> list[str]:
    names = folder_paths.get_filename_list(_diffusion_folder_key())
    return [n for n in names if n.lower().endswith(EXTENSIONS["safetensors"])]


def list_gguf_models() -> list[str]:
    return list(folder_paths.get_filename_list(register_gguf_folder()))


def _escapes(name: str) -> bool:
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\")):
        return True
    normalized = os.path.normpath(name)
    parts = normalized.replace("\\", "/").split("/")
    return ".." in parts


def resolve_model_path(model_type: str, name: str) -> str:
    """The full path of ``name`` (as listed by the node) inside the diffusion_models folders.

    Raises ValueError for a missing choice, a wrong extension or a name that leads outside the folders
    ("../x", absolute paths), FileNotFoundError when no folder holds the file.
    """
    check_choice("model_type", model_type, MODEL_TYPES)
    input_name = f"{model_type}_model"
    if not name or name == NO_MODEL:
        raise ValueError(
            f"model_type is {model_type} but no {input_name} is selected: put a "
            f"{'/'.join(EXTENSIONS[model_type])} file into ComfyUI/models/diffusion_models"
        )
    if _escapes(name):
        raise ValueError(f"{input_name} {name!r} resolves outside the diffusion_models folders")
    if not name.lower().endswith(EXTENSIONS[model_type]):
        raise ValueError(
            f"{input_name} {name!r} is not a {'/'.join(EXTENSIONS[model_type])} file "
            f"(model_type is {model_type})"
        )
    folders = folder_paths.get_folder_paths(_diffusion_folder_key())
    for folder in folders:
        candidate = os.path.join(folder, os.path.normpath(name))
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"{input_name} {name!r} not found in the diffusion_models folders ({', '.join(folders) or 'none'})"
    )


# --------------------------------------------------------------------------------------------
# Safetensors
# --------------------------------------------------------------------------------------------


# The safetensors library's own header limit; checked first, so a length that lies is never allocated.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# Tensor dtypes a diffusion model's weights can be stored in (safetensors names).
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def read_safetensors_tensors(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """(name -> shape, name -> dtype, metadata) from a safetensors header, read by the ``safetensors`` library.

    Reads only the header (the library memory-maps the file and checks that its tensors cover the data
    exactly). Raises ValueError naming the file for files that are not safetensors or are truncated.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path} is not a safetensors file ({size} bytes)")
    header_len = int.from_bytes(prefix, "little")
    if header_len <= 1 or 8 + header_len > size or header_len > MAX_SAFETENSORS_HEADER_BYTES:
        # Checked before the library sees the file: a length that lies must not become an allocation.
        raise ValueError(
            f"{path} is truncated or not a safetensors file: it announces a {header_len}-byte header "
            f"but has {size} bytes"
            + (f" (at most {MAX_SAFETENSORS_HEADER_BYTES} are read)" if 8 + header_len <= size else "")
        )
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes, dtypes = {}, {}
            for name in f.keys():
                tensor = f.get_slice(name)
                shapes[name] = tuple(tensor.get_shape())
                dtypes[name] = tensor.get_dtype()
    except safetensors.SafetensorError as exc:
        if "not fully covered" in str(exc):
            raise ValueError(
                f"{path} is truncated or damaged: its tensors do not cover its {size} bytes ({exc})"
            ) from exc
        raise ValueError(f"{path} is not a safetensors file (bad header: {exc})") from exc
    return shapes, dtypes, metadata


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(name -> shape, metadata) from a safetensors header (see :func:`read_safetensors_tensors`)."""
    shapes, _dtypes, metadata = read_safetensors_tensors(path)
    return shapes, metadata


# --------------------------------------------------------------------------------------------
# Completeness: every tensor ComfyUI's model for these weights has, with its shape
# --------------------------------------------------------------------------------------------

# Errors ComfyUI's detection and loading raise on weights they do not expect; they reach the user as a
# ValueError naming the file (an out-of-memory error or an interrupt is not one of them).
COMFY_LOAD_ERRORS = (
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ZeroDivisionError,
    RecursionError,
    OverflowError,
)
SHOWN = 5  # tensors named per problem


class UnrecognisedWeights(Exception):
    """ComfyUI's model detection found no model for the weights (under this key prefix)."""

    def __init__(self, prefix: str):
        super().__init__(prefix)
        self.prefix = prefix


def expected_wan_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(key prefix, name -> shape) of the model ComfyUI builds for weights of these shapes.

    The source of truth is ComfyUI itself: its own prefix and model detection on meta tensors of these
    shapes, and the model class it picks built on the meta device (no memory for weights).
    """
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(meta)
    stripped = comfy.utils.state_dict_prefix_replace(meta, {prefix: ""}, filter_keys=True)
    if not stripped:
        prefix, stripped = "", meta
    config = comfy.model_detection.model_config_from_unet(stripped, "")
    if config is None:
        raise UnrecognisedWeights(prefix)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(stripped, "", device=torch.device("meta"))
    return prefix, {name: tuple(t.shape) for name, t in model.diffusion_model.state_dict().items()}


def _quant_packed(name: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A weight in one of ComfyUI's quantized layouts (packed bytes, described by a sibling entry)."""
    return f"{name.rsplit('.', 1)[0]}.comfy_quant" in shapes


def _listing(items: list[str]) -> str:
    more = f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


# Parameters of ComfyUI's scaled-fp8 / mixed-precision layers that a file may leave out (or store as (1,)
# instead of ()): an fp8_scaled file scales only the layers it quantized.
OPTIONAL_QUANT_PARAMS = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale")


def check_complete_wan(
    name: str,
    shapes: dict[str, tuple[int, ...]],
    detection,
    dtypes: dict[str, str] | None = None,
) -> None:
    """Refuse (ValueError naming the file, the tensors and what was detected) a file that lacks a tensor
    of the model ComfyUI would build for it, or holds one with another shape or a non-float dtype.

    ComfyUI itself only warns ("unet missing") and samples from uninitialised weights.
    """
    try:
        prefix, expected = expected_wan_tensors(shapes)
    except UnrecognisedWeights as exc:
        under = f" under the key prefix {exc.prefix!r}" if exc.prefix else ""
        raise ValueError(
            f"{name} is not a loadable WAN model (detected: {detection.describe()}): ComfyUI's model "
            f"detection does not recognise its weights{under}; the file is damaged or not a WAN diffusion "
            "model"
        ) from None
    except torch.OutOfMemoryError:
        raise
    except COMFY_LOAD_ERRORS as exc:
        raise ValueError(
            f"{name} is not a loadable WAN model (detected: {detection.describe()}): ComfyUI's model "
            f"detection fails on its weights ({type(exc).__name__}: {exc}); the file is damaged or not a "
            "WAN diffusion model"
        ) from exc
    missing, misshapen, not_float = [], [], []
    for key, shape in expected.items():
        stored = prefix + key
        if key.endswith(OPTIONAL_QUANT_PARAMS):
            continue  # per-layer fp8 scales: ComfyUI's scaled-fp8 layers default them (1.0) when absent
        if stored not in shapes:
            missing.append(stored)
        elif _quant_packed(stored, shapes):
            continue
        elif tuple(shapes[stored]) != shape:
            misshapen.append(f"{stored} {tuple(shapes[stored])} (expected {shape})")
        elif dtypes is not None and dtypes.get(stored) not in SAFETENSORS_FLOAT_DTYPES:
            not_float.append(f"{stored} ({dtypes.get(stored)})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing: {_listing(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensors with the wrong shape: {_listing(misshapen)}")
    if not_float:
        problems.append(f"{len(not_float)} tensors not stored as floating point: {_listing(not_float)}")
    if problems:
        raise ValueError(
            f"{name} is not a complete WAN model: {'; '.join(problems)}. Detected {detection.describe()}; "
            "the file is damaged or incomplete (download it again)"
        )
    unused, built = unbuilt_block_tensors(prefix, shapes, expected)
    if unused:
        raise ValueError(
            f"{name} is damaged or not a WAN file: {len(unused)} of its tensors belong to blocks the model "
            f"ComfyUI builds from it does not have ({built}; it counts blocks from 0 up to the first gap): "
            f"{_listing(unused)}"
        )


def unbuilt_block_tensors(
    prefix: str, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> tuple[list[str], str]:
    """(file tensors under an entry of a block list the model has but not that entry, e.g. ``blocks.9.*``
    when ComfyUI built blocks 0-6; the block counts it built, e.g. "7 blocks").

    ComfyUI counts consecutive blocks, so a block renamed or dropped in the middle gives a shorter model
    and its tensors are only reported as "unet unexpected"."""
    modules = {
        ".".join(parts[:i]) for parts in (key.split(".") for key in expected) for i in range(1, len(parts))
    }
    unused, lists = [], set()
    for stored in shapes:
        if not stored.startswith(prefix) or stored[len(prefix) :] in expected:
            continue
        parts = stored[len(prefix) :].split(".")[:-1]
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None or ".".join(parts[:index]) not in modules:
            continue  # not an entry of a block list the model has (left to ComfyUI)
        if ".".join(parts[: index + 1]) not in modules:
            unused.append(stored)
            lists.add(".".join(parts[:index]))
    counts = []
    for name in sorted(lists):
        n = sum(1 for m in modules if m.startswith(name + ".") and m[len(name) + 1 :].isdigit())
        counts.append(f"{n} {name}")
    return unused, ", ".join(counts)


def _comfy_load(name: str, load, *args, **kwargs):
    """ComfyUI's loader, its errors on unexpected weights turned into a ValueError naming the file."""
    try:
        return load(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except COMFY_LOAD_ERRORS as exc:
        raise ValueError(
            f"{name}: ComfyUI could not load it ({type(exc).__name__}: {exc}); the file is damaged or not a "
            "model this ComfyUI version can load"
        ) from exc


def safetensors_model_options(fp8_optimization: str, weight_dtype: str) -> tuple[dict, torch.dtype | None]:
    """(model_options for comfy.sd, compute dtype to force or None).

    fp8 on: weights stored in that fp8 type exactly as UNETLoader's fp8 choices do; weight_dtype is then the
    compute dtype. fp8 off: weight_dtype is the storage dtype and ComfyUI picks the compute dtype.
    "auto" leaves the choice to ComfyUI.
    """
    check_choice("fp8_optimization", fp8_optimization, FP8_OPTIMIZATIONS)
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    chosen = FLOAT_DTYPES.get(weight_dtype)
    if fp8_optimization != "disabled":
        return {"dtype": FP8_DTYPES[fp8_optimization]}, chosen
    return ({"dtype": chosen} if chosen is not None else {}), None


def _set_compute_dtype(patcher, dtype: torch.dtype) -> None:
    """What ComfyUI's ModelComputeDtype node does (set_model_compute_dtype), where the patcher has it."""
    if hasattr(patcher, "set_model_compute_dtype"):
        patcher.set_model_compute_dtype(dtype)
    else:
        patcher.add_object_patch("manual_cast_dtype", dtype)
        patcher.force_cast_weights = True


def _log_choice(name: str, detection, choice: ResolvedWanType) -> None:
    log.info("[BlockSwap] WAN Model Loader: %s: %s", name, detection.describe())
    for note in choice.notes:
        log.info("[BlockSwap] WAN Model Loader: %s", note)


class HeldBackCopies(TorchFunctionMode):
    """While active: copies from the watched (file) tensors into other tensors are recorded, not made.

    ComfyUI builds a model by allocating every parameter and then copying the state dict into it
    (``Tensor.copy_`` in ``load_state_dict``). A fresh allocation costs no RAM until it is written, so a
    parameter whose copy is held back stays untouched: a swapped block's parameter is then filled once,
    straight from the file into its host slab (:meth:`BlockSwapEngine.park` with `sources`), and its
    never-touched allocation is returned when the slab takes its place. :meth:`complete` makes the
    copies nobody took, exactly as ComfyUI would have made them, wherever the parameters lie by then.

    With dynamic VRAM on (ComfyUI 0.16+ with comfy-aimdo) its lazily built layers take a file tensor as
    ``Parameter(tensor.clone())`` instead (``_lazy_load_from_state_dict``): that clone is held back the same
    way, as a fresh allocation the parameter is built around.
    """

    def __init__(self):
        super().__init__()
        self._watched: dict[int, torch.Tensor] = {}
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(destination) -> (dst, src)
        self._owners: dict[int, tuple[torch.nn.Module, str]] = {}
        self._clones: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # data_ptr -> (fresh tensor, src)
        ops = getattr(comfy.ops, "disable_weight_init", None)
        lazy = getattr(ops, "_lazy_load_from_state_dict", None)
        self._lazy_loader = getattr(lazy, "__code__", None)

    def watch(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._watched[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) == 2 and not kwargs:
            dst, src = args
            # Parameters only: a module keeps its Parameter objects when it moves (`.data` is re-pointed),
            # while a moved buffer is a new tensor, which a later fill would miss. A second copy into the
            # same parameter replaces the first, as it would have overwritten it.
            if (
                self._watched.get(id(src)) is src
                and type(dst) is torch.nn.Parameter
                and tuple(dst.shape) == tuple(src.shape)
            ):
                self.pending[id(dst)] = (dst, src)
                return dst
        if (
            func is torch.Tensor.clone
            and len(args) == 1
            and not kwargs
            and self._watched.get(id(args[0])) is args[0]
            and type(args[0]) is torch.Tensor
            and args[0].numel() > 0
            and self._called_by_lazy_loader()
        ):
            src = args[0]
            fresh = torch.empty_like(src, memory_format=torch.contiguous_format)
            self._clones[fresh.data_ptr()] = (fresh, src)
            return fresh
        return func(*args, **kwargs)

    def _called_by_lazy_loader(self) -> bool:
        """The clone is ComfyUI's lazy layer loader's, which wraps it in a Parameter at once (any other
        clone of a file tensor may be read right away, so it is made)."""
        frame = sys._getframe(2)
        for _ in range(3):
            if frame is None:
                return False
            if frame.f_code is self._lazy_loader:
                return True
            frame = frame.f_back
        return False

    def bind_owners(self, root: torch.nn.Module) -> None:
        """Remember which module attribute holds each held-back parameter (right after the build): a host
        that later replaces a Parameter object (ComfyUI 0.8.1+ does for some fp8_scaled layers when it
        loads them) gets its current parameter filled, not the one it dropped. A held-back clone becomes
        the pending copy into the parameter built around it."""
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is None:
                    continue
                clone = self._clones.pop(param.data_ptr(), None) if param.numel() else None
                if clone is not None and tuple(param.shape) == tuple(clone[1].shape):
                    self.pending[id(param)] = (param, clone[1])
                if id(param) in self.pending:
                    self._owners[id(param)] = (module, name)
        with torch.no_grad():  # a clone no parameter took: made now, as ComfyUI made it
            for fresh, src in self._clones.values():
                fresh.copy_(src)
        self._clones.clear()

    def sources(self) -> dict[int, torch.Tensor]:
        """id(parameter or buffer) -> the file tensor its value is to be read from."""
        return {key: src for key, (_dst, src) in self.pending.items()}

    def owner(self, key: int) -> tuple[torch.nn.Module, str] | None:
        """(module, attribute) that held the pending parameter `key` when the model was built."""
        return self._owners.get(key)

    def drop(self, keys) -> None:
        """Forget the copies of `keys`: their values were read elsewhere (into host slabs)."""
        for key in keys:
            self.pending.pop(key, None)
        if not self.pending:
            self._release()

    def complete(self, taken: set[int] = frozenset(), on_copy=None, only=None) -> int:
        """Make every held-back copy except those in `taken` (read into slabs instead), or only those in
        `only`, each into the parameter its module holds now, wherever that lies. Returns the bytes copied;
        once none is left, the file tensors are let go."""
        copied = 0
        with torch.no_grad():
            for key in list(self.pending):
                if key in taken or (only is not None and key not in only):
                    continue
                dst, src = self.pending.pop(key)
                owner = self._owners.get(key)
                current = owner[0]._parameters.get(owner[1]) if owner is not None else None
                if current is not None and current is not dst and tuple(current.shape) == tuple(src.shape):
                    dst = current
                dst.copy_(src)
                copied += dst.numel() * dst.element_size()
                if on_copy is not None:
                    on_copy(dst)
        if only is None:
            self.pending.clear()
        if not self.pending:
            self._release()
        return copied

    def _release(self) -> None:
        self.pending.clear()
        self._watched.clear()
        self._owners.clear()
        self._clones.clear()


def _check_safetensors(path: str, wan_version: str, model_variant: str) -> None:
    """Everything checked before a safetensors file is built: readable, complete, the chosen WAN type."""
    name = os.path.basename(path)
    shapes, dtypes, metadata = read_safetensors_tensors(path)
    try:
        detection = detect_wan(shapes, metadata)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    choice = resolve_choice(detection, wan_version, model_variant, source=name)
    check_complete_wan(name, shapes, detection, dtypes)
    _log_choice(name, detection, choice)


def _build_safetensors(path: str, options: dict, held_back: HeldBackCopies, disable_dynamic: bool):
    """ComfyUI's own diffusion-model loading (``load_diffusion_model``'s two steps: its file reader, then
    its state-dict loader), with the copies into the new parameters held back by `held_back`."""
    name = os.path.basename(path)
    state_dict, metadata = _comfy_load(name, comfy.utils.load_torch_file, path, return_metadata=True)
    accepted = inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
    kwargs = {}
    if "metadata" in accepted:  # 0.3.65+; 0.3.64's load_diffusion_model passes none either
        kwargs["metadata"] = metadata
    if disable_dynamic and "disable_dynamic" in accepted:
        kwargs["disable_dynamic"] = True
    held_back.watch(state_dict.values())
    with held_back:
        patcher = _comfy_load(
            name, comfy.sd.load_diffusion_model_state_dict, state_dict, model_options=options, **kwargs
        )
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI could not detect the model type of this file")
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (
            comfy.sd.load_diffusion_model,
            (path, options),
        )  # as its loader sets it
    return patcher


def load_safetensors_model(
    path: str,
    wan_version: str = "auto",
    model_variant: str = "auto",
    fp8_optimization: str = "disabled",
    weight_dtype: str = "auto",
    held_back: HeldBackCopies | None = None,
    disable_dynamic: bool = False,
):
    """A ModelPatcher for a WAN safetensors file, built by ComfyUI's own diffusion-model loader.

    held_back: for the combined loader: the copies from the file into the parameters are held back
    (:class:`HeldBackCopies`), to be read straight into host slabs or completed later.
    """
    options, compute_dtype = safetensors_model_options(fp8_optimization, weight_dtype)
    name = os.path.basename(path)
    progress = comfy.utils.ProgressBar(3)
    _check_safetensors(path, wan_version, model_variant)
    progress.update(1)
    if held_back is None:
        patcher = _comfy_load(name, comfy.sd.load_diffusion_model, path, model_options=options)
    else:
        patcher = _build_safetensors(path, options, held_back, disable_dynamic)
    progress.update(1)
    if compute_dtype is not None:
        _set_compute_dtype(patcher, compute_dtype)
    log.info(
        "[BlockSwap] WAN Model Loader: weights %s, compute %s",
        _dtype_name(patcher.model.get_dtype()),
        _dtype_name(compute_dtype or patcher.model.manual_cast_dtype or patcher.model.get_dtype()),
    )
    progress.update(1)
    return patcher


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def _gguf_params(model: torch.nn.Module):
    for module in model.modules():
        for param in module._parameters.values():
            if is_gguf_weight(param):
                yield param


class WanGGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher for GGUF models: LoRA on quantized weights is kept on ``weight.patches``, not fused.

    ComfyUI fuses LoRA into a weight it loads (``patch_weight_to_device``), which cannot work on quantized
    bytes. Here a GGUF weight instead gets ``patches = [(patch_list, key)]``, which the GGUF layers apply
    after dequantizing in every forward (the same convention the BlockSwap engine uses for swapped blocks);
    unpatching clears them. Float weights are patched the ComfyUI way.
    """

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        weight = comfy.utils.get_attr(self.model, key)
        if not is_gguf_weight(weight):
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        # ComfyUI 0.16+: (key, device_to, inplace_update, return_weight, force_cast).
        return_weight = kwargs.get("return_weight", args[1] if len(args) > 1 else False)
        patches = self.patches.get(key)
        if return_weight:
            out = (weight.to(device_to) if device_to is not None else weight).detach()  # own attributes
            out.patches = [(patches, key)] if patches else []
            return out
        if patches:
            weight.patches = [(patches, key)]
        return weight

    def unpatch_model(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        if unpatch_weights:
            for param in _gguf_params(self.model):
                if param.patches:
                    param.patches = []
        return super().unpatch_model(device_to, unpatch_weights, *args, **kwargs)


def load_gguf_model(
    path: str,
    wan_version: str = "auto",
    model_variant: str = "auto",
    fp8_optimization: str = "disabled",
    weight_dtype: str = "auto",
    held_back: HeldBackCopies | None = None,
):
    """A WanGGUFModelPatcher for a WAN GGUF file: quantized weights stay memory-mapped GGUFWeights.

    held_back: as for :func:`load_safetensors_model` (the float tensors' copies; quantized weights are
    never copied at load: they stay views of the file)."""
    name = os.path.basename(path)
    if fp8_optimization != "disabled" or weight_dtype != "auto":
        log.info(
            "[BlockSwap] WAN Model Loader: fp8_optimization=%s and weight_dtype=%s do not apply to GGUF "
            "models (their quantization is in the file): ignored",
            fp8_optimization,
            weight_dtype,
        )
    state_dict, metadata = load_gguf_state_dict(path)
    shapes = logical_shapes(state_dict)
    try:
        detection = detect_wan(shapes, metadata)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    choice = resolve_choice(detection, wan_version, model_variant, source=name)
    check_complete_wan(name, shapes, detection)  # GGUF types are all float or quantized (checked on read)
    _log_choice(name, detection, choice)

    n_weights = sum(1 for k in state_dict if k.endswith(".weight"))
    progress = comfy.utils.ProgressBar(n_weights + 1)
    kwargs = {}
    if "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
        # ComfyUI 0.16+: its dynamic-VRAM patcher streams float weights by itself; GGUF layers cast their
        # own weights, so the model gets a classic patcher (as ComfyUI-GGUF's models do).
        kwargs["disable_dynamic"] = True
    if held_back is not None:
        held_back.watch(state_dict.values())
    with load_progress(lambda: progress.update(1)), held_back or contextlib.nullcontext():
        patcher = _comfy_load(
            name,
            comfy.sd.load_diffusion_model_state_dict,
            state_dict,
            model_options={"custom_operations": GGUFOps},
            **kwargs,
        )
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI could not detect the model type of this GGUF file")
    patcher.__class__ = WanGGUFModelPatcher
    quantized = sum(1 for _ in _gguf_params(patcher.model))
    log.info(
        "[BlockSwap] WAN Model Loader: %s: %d quantized weights kept as GGUF bytes (%s), compute %s",
        name,
        quantized,
        metadata.get("gguf.file_type_name", "mixed types"),
        _dtype_name(patcher.model.manual_cast_dtype or patcher.model.get_dtype()),
    )
    progress.update_absolute(n_weights + 1)
    return patcher


# --------------------------------------------------------------------------------------------
# The node's entry point
# --------------------------------------------------------------------------------------------


def load_wan_model(
    model_type: str,
    safetensors_model: str,
    gguf_model: str,
    wan_version: str = "auto",
    model_variant: str = "auto",
    fp8_optimization: str = "disabled",
    weight_dtype: str = "auto",
):
    """Everything the WAN Model Loader node does: pick the file, check it, load it, return a ModelPatcher."""
    name = safetensors_model if model_type == "safetensors" else gguf_model
    path = resolve_model_path(model_type, name)
    if model_type == "gguf":
        return load_gguf_model(path, wan_version, model_variant, fp8_optimization, weight_dtype)
    return load_safetensors_model(path, wan_version, model_variant, fp8_optimization, weight_dtype)


# --------------------------------------------------------------------------------------------
# The combined loader: read the file straight into the swap layout
# --------------------------------------------------------------------------------------------


def load_swapped_wan_model(
    model_type: str,
    safetensors_model: str,
    gguf_model: str,
    wan_version: str,
    model_variant: str,
    fp8_optimization: str,
    weight_dtype: str,
    config: SwapConfig,
):
    """What WAN Model Loader -> WAN 2.2 BlockSwap gives, with every tensor read from the file once, into
    its final home: swapped blocks straight into their host slabs (pinned within the budget) now, the other
    weights into their parameters where ComfyUI's first load of the model puts them (the GPU, as far as its
    grant allows), so none of them is moved to the GPU before sampling and back again when a LoRA or a text
    encoder loads in between.

    The model is built by ComfyUI's own loader (its model class, key conversion, fp8 handling), with the
    copies into the new parameters held back until the swap plan is known (:class:`HeldBackCopies`).
    """
    from .callbacks import apply_block_swap, fill_at_first_load, plan_of

    if not isinstance(config, SwapConfig):
        raise TypeError(f"config must be a SwapConfig (got {type(config).__name__})")
    started = time.perf_counter()
    name = safetensors_model if model_type == "safetensors" else gguf_model
    path = resolve_model_path(model_type, name)
    held_back = HeldBackCopies()
    try:
        if model_type == "gguf":
            patcher = load_gguf_model(
                path, wan_version, model_variant, fp8_optimization, weight_dtype, held_back
            )
        else:
            patcher = load_safetensors_model(
                path,
                wan_version,
                model_variant,
                fp8_optimization,
                weight_dtype,
                held_back,
                disable_dynamic=config.override_dynamic_vram,
            )
        held_back.bind_owners(patcher.model)
        swapped = apply_block_swap(patcher, config)
        plan = plan_of(swapped)
        if plan is None:  # dynamic VRAM keeps the model: every weight filled now, as ComfyUI fills it
            held_back.complete()
            return swapped
        if plan.auto:
            plan.plan_from_free_vram(
                swapped
            )  # the blocks read into slabs now; ComfyUI's first load corrects it
        units = plan.engine.swapped_units
        taken = {id(t) for unit in units for *_, t in unit.tensors()} & held_back.pending.keys()
        slab_tensors = [sum(1 for _ in unit.tensors()) for unit in units]
        progress = comfy.utils.ProgressBar(max(sum(slab_tensors), 1))
        plan.build_host_copies(
            held_back.sources(),
            on_slab_built=lambda done, _total: progress.update(slab_tensors[done - 1]),
        )
        held_back.drop(taken)
        fill_at_first_load(plan.diffusion_model, held_back)
    except BaseException:
        held_back.drop(list(held_back.pending))
        raise
    units = plan.engine.swapped_units  # ComfyUI's load may have re-planned (auto)
    in_slabs = [u for u in units if u.slab is not None and not u.in_file]
    in_file = [u for u in units if u.in_file]
    slab_bytes = sum(u.nbytes for u in in_slabs)
    pinned = sum(u.nbytes for u in in_slabs if u.slab_pinned)
    log.info(
        "[BlockSwap] WAN BlockSwap Model Loader: %s: %s read into host slabs of %d swapped units (%s pinned, %s "
        "pageable), %d swapped units left in the file, in %.2f s; the other %d weights are read from the file "
        "when ComfyUI first loads the model",
        name,
        format_bytes(slab_bytes),
        len(in_slabs),
        format_bytes(pinned),
        format_bytes(slab_bytes - pinned),
        len(in_file),
        time.perf_counter() - started,
        len(held_back.pending),
    )
    return swapped

"""The pack's ComfyUI nodes. Thin: validate inputs, call into callbacks.py and loader.py."""

from __future__ import annotations

from . import loader, looper
from .callbacks import apply_block_swap
from .config import HOST_MEMORY_CHOICES, MAX_BLOCKS, MAX_PREFETCH, MAX_VACE_BLOCKS, SwapConfig
from .wan.detect import MODEL_VARIANTS, WAN_VERSIONS

CATEGORY = "ComfyUI_Wan22Blockswap"


def swap_node_inputs(leading: dict[str, tuple]) -> dict[str, dict]:
    """A BlockSwap node's INPUT_TYPES: its own `leading` inputs, then the swap settings every BlockSwap node
    shares in the seed's order, then the optional inputs this pack added (always last)."""
    inputs = swap_inputs()
    inputs["required"] = {**leading, **inputs["required"]}
    inputs["optional"].update(late_optional_inputs())
    return inputs


def swap_inputs() -> dict[str, dict]:
    """The swap settings shared by every BlockSwap node, with tooltips (sizes from WAN's shapes)."""
    d = SwapConfig()
    return {
        "required": {
            "blocks_to_swap": (
                "INT",
                {
                    "default": d.blocks_to_swap,
                    "min": 0,
                    "max": MAX_BLOCKS,
                    "step": 1,
                    "tooltip": "Transformer blocks kept in CPU RAM and streamed to the GPU when they run (the last "
                    "N blocks). Each saves one block of VRAM: about 700 MB for 14B in bf16 (350 MB in fp8), 330 "
                    "MB for 5B, 93 MB for 1.3B. Larger than the model's block count means all blocks (with a warning). "
                    "Not used when auto_blocks_to_swap is on.",
                },
            ),
            "offload_txt_emb": (
                "BOOLEAN",
                {
                    "default": d.offload_txt_emb,
                    "tooltip": "Also stream the text embedding from CPU RAM: saves about 94 MB for 14B "
                    "(bf16), 17 MB for 1.3B. It runs once per step.",
                },
            ),
            "offload_img_emb": (
                "BOOLEAN",
                {
                    "default": d.offload_img_emb,
                    "tooltip": "Also stream the CLIP image embedding of i2v models from CPU RAM: saves about "
                    "16 MB for 14B (bf16). Ignored for models without one.",
                },
            ),
        },
        "optional": {
            "use_non_blocking": (
                "BOOLEAN",
                {
                    "default": d.use_non_blocking,
                    "tooltip": "Pin the swapped blocks in RAM (page-locked, within ComfyUI's pinned-memory limit, or "
                    "45% of RAM where it has none, less what ComfyUI pinned itself, shared between the models "
                    "that swap; beyond that ordinary RAM with a warning) and copy them asynchronously. Needed, "
                    "with prefetch_blocks >= 1, for copies to run while other blocks compute.",
                },
            ),
            "vace_blocks_to_swap": (
                "INT",
                {
                    "default": d.vace_blocks_to_swap,
                    "min": 0,
                    "max": MAX_VACE_BLOCKS,
                    "step": 1,
                    "tooltip": "VACE blocks kept in CPU RAM (VACE models only). 0 = auto: the same share of "
                    "VACE blocks as blocks_to_swap is of the main blocks. Not used when auto_blocks_to_swap is "
                    "on (it swaps the same share of VACE blocks as it picks of the main blocks).",
                },
            ),
            "prefetch_blocks": (
                "INT",
                {
                    "default": d.prefetch_blocks,
                    "min": 0,
                    "max": MAX_PREFETCH,
                    "step": 1,
                    "tooltip": "How many swapped blocks are copied ahead of the one running. 0 = copy each "
                    "block when it starts (no overlap). N uses N+1 block-sized VRAM slots.",
                },
            ),
            "block_swap_debug": (
                "BOOLEAN",
                {
                    "default": d.block_swap_debug,
                    "tooltip": "Log the swap plan and, after each sampling run, bytes moved, copy bandwidth, "
                    "time compute waited for copies, and peak VRAM.",
                },
            ),
        },
    }


def late_optional_inputs() -> dict[str, tuple]:
    """The optional inputs every BlockSwap node ends with, in this order (after the seed's inputs)."""
    return {
        "override_dynamic_vram": override_dynamic_vram_input(),
        "auto_blocks_to_swap": auto_input(),
        "host_memory": host_memory_input(),
    }


def host_memory_input() -> tuple:
    return (
        HOST_MEMORY_CHOICES,
        {
            "default": SwapConfig().host_memory,
            "tooltip": "Where swapped blocks wait between their runs. auto: a copy in RAM for each block while "
            "those copies leave a quarter of the RAM (or of the container's limit) free; blocks beyond that whose "
            "weights are a memory-mapped file's own bytes (GGUF) stay in the file and are copied to the GPU "
            "from it: no extra RAM, slower copies. ram: a RAM copy of every swapped block (the fastest, pinned "
            "within the budget with use_non_blocking). file: no RAM copy of any block whose weights are a "
            "file's bytes. Weights converted when loaded (another dtype) always get a RAM copy.",
        },
    )


def auto_input() -> tuple:
    return (
        "BOOLEAN",
        {
            "default": False,
            "tooltip": "Choose the swapped blocks at every load from the VRAM ComfyUI grants this model (free "
            "VRAM minus what the run needs): the fewest last blocks (and the same share of VACE blocks) whose "
            "resident weights plus the prefetch slots fit. Nothing is swapped when the whole model fits. "
            "More blocks are swapped as soon as the grant shrinks; fewer only once it grew by two blocks. "
            "blocks_to_swap and vace_blocks_to_swap are then not used.",
        },
    )


def override_dynamic_vram_input() -> tuple:
    return (
        "BOOLEAN",
        {
            "default": False,
            "tooltip": "ComfyUI 0.16+ with dynamic VRAM already streams weights per layer; by default this "
            "node then leaves the model to ComfyUI and says so in the log. Turn on to use block swapping "
            "instead (the same weights, taken out of dynamic VRAM; nothing is reloaded).",
        },
    )


class WAN22BlockSwap:
    DESCRIPTION = (
        "Keeps the chosen WAN transformer blocks in CPU RAM and streams each one to the GPU just before it "
        "runs, through a few preallocated VRAM slots. Swapped blocks never enter VRAM at load time, and "
        "ComfyUI's memory manager sees the true VRAM use. Returns a clone: the input model is unchanged."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with block swapping applied while it samples.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return swap_node_inputs(
            {"model": ("MODEL", {"tooltip": "A WAN 2.1/2.2 model from any loader (safetensors, fp8, GGUF)."})}
        )

    def apply(self, model, **settings):
        return (apply_block_swap(model, SwapConfig(**settings)),)


class WAN22BlockSwapDeprecatedId(WAN22BlockSwap):
    """The same node under the id `WAN22BlockSwap`, which earlier versions of this pack registered.

    Kept so that workflows saved with that id still load and run; ComfyUI lists it as deprecated
    (`DEPRECATED`, read by server.py's node info), and the frontend hides it from search.
    """

    DESCRIPTION = "Deprecated id of WAN 2.2 BlockSwap (wan22BlockSwap), kept for old workflows. " + (
        WAN22BlockSwap.DESCRIPTION
    )
    DEPRECATED = True


# The seed's id. Never `wanBlockSwap`: ComfyUI 0.8+ reserves that id for a built-in no-op node.
NODE_CLASS_MAPPINGS = {
    "wan22BlockSwap": WAN22BlockSwap,
    "WAN22BlockSwap": WAN22BlockSwapDeprecatedId,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "wan22BlockSwap": "WAN 2.2 BlockSwap",
    "WAN22BlockSwap": "WAN 2.2 BlockSwap (deprecated id WAN22BlockSwap)",
}


class WANModelLoader:
    DESCRIPTION = (
        "Loads a WAN 2.1/2.2 diffusion model from ComfyUI's diffusion_models folder, as safetensors or GGUF. "
        "Checks the file first (complete, inside the model folders, a WAN model matching the chosen version and "
        "variant). Safetensors go through ComfyUI's own loader, so the model equals Load Diffusion Model's; "
        "GGUF weights stay quantized in RAM (memory-mapped) and are dequantized per layer on the GPU, LoRA "
        "included. No block swapping here: connect the output to a WAN 2.2 BlockSwap node for that."
    )
    CATEGORY = "WAN"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The WAN diffusion model. Connect it to a WAN 2.2 BlockSwap node to save VRAM.",)
    FUNCTION = "load_model"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_type": (
                    list(loader.MODEL_TYPES),
                    {
                        "default": "safetensors",
                        "tooltip": "File format to load: safetensors (bf16/fp16/fp8 weights) or gguf (quantized). "
                        "Only the file chosen for this format is used.",
                    },
                ),
                "safetensors_model": (
                    # NO_MODEL always listed: the combo of the format not in use validates as "none".
                    [*loader.list_safetensors_models(), loader.NO_MODEL],
                    {
                        "tooltip": "The .safetensors file from models/diffusion_models (or the legacy "
                        "models/unet). Used when model_type is safetensors.",
                    },
                ),
                "gguf_model": (
                    [*loader.list_gguf_models(), loader.NO_MODEL],
                    {
                        "tooltip": "The .gguf file from models/diffusion_models (or the legacy models/unet). "
                        "Used when model_type is gguf.",
                    },
                ),
                "wan_version": (
                    list(WAN_VERSIONS),
                    {
                        "default": "auto",
                        "tooltip": "auto reads it from the weights (and file metadata). 2.2 is visible in the "
                        "weights only for the 5B TI2V, S2V, Animate and Fun Camera models; WAN 2.2 A14B high/low "
                        "files have the 2.1 architecture and load the same way. A choice the weights rule out "
                        "is an error.",
                    },
                ),
                "model_variant": (
                    list(MODEL_VARIANTS),
                    {
                        "default": "auto",
                        "tooltip": "auto detects it from the weights the way ComfyUI does (VACE, camera, S2V, "
                        "HuMo and Animate weights, image embedding for i2v). A variant the weights rule out is an "
                        "error.",
                    },
                ),
                "fp8_optimization": (
                    list(loader.FP8_OPTIMIZATIONS),
                    {
                        "default": "disabled",
                        "tooltip": "Store the weights as fp8 (half the memory of bf16), exactly like Load "
                        "Diffusion Model's fp8 weight_dtype. Safetensors only; ignored for GGUF.",
                    },
                ),
                "weight_dtype": (
                    list(loader.WEIGHT_DTYPES),
                    {
                        "default": "auto",
                        "tooltip": "With fp8 off: the dtype the weights are stored in. With fp8 on: the dtype "
                        "layers compute in. auto lets ComfyUI choose for the GPU. Safetensors only; ignored for "
                        "GGUF.",
                    },
                ),
            }
        }

    def load_model(
        self,
        model_type,
        safetensors_model,
        gguf_model,
        wan_version="auto",
        model_variant="auto",
        fp8_optimization="disabled",
        weight_dtype="auto",
    ):
        model = loader.load_wan_model(
            model_type,
            safetensors_model,
            gguf_model,
            wan_version,
            model_variant,
            fp8_optimization,
            weight_dtype,
        )
        return (model,)


NODE_CLASS_MAPPINGS["WANModelLoader"] = WANModelLoader
NODE_DISPLAY_NAME_MAPPINGS["WANModelLoader"] = "WAN Model Loader"


class WAN22BlockSwapLoader:
    DESCRIPTION = (
        "WAN Model Loader and WAN 2.2 BlockSwap in one node, with the same inputs and the same resulting "
        "model, loaded without a second copy of anything: each swapped block is read from the file straight "
        "into its host copy in CPU RAM (pinned within the budget when use_non_blocking is on), not to the "
        "GPU; ComfyUI's own load places the other weights, and each is read from the file where it lands."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The WAN model with block swapping applied while it samples.",)
    FUNCTION = "load_model"

    @classmethod
    def INPUT_TYPES(cls):
        return swap_node_inputs(WANModelLoader.INPUT_TYPES()["required"])

    def load_model(
        self,
        model_type,
        safetensors_model,
        gguf_model,
        wan_version="auto",
        model_variant="auto",
        fp8_optimization="disabled",
        weight_dtype="auto",
        **settings,
    ):
        config = SwapConfig(**settings)  # checked before the file is read
        model = loader.load_swapped_wan_model(
            model_type,
            safetensors_model,
            gguf_model,
            wan_version,
            model_variant,
            fp8_optimization,
            weight_dtype,
            config,
        )
        return (model,)


NODE_CLASS_MAPPINGS["WAN22BlockSwapLoader"] = WAN22BlockSwapLoader
NODE_DISPLAY_NAME_MAPPINGS["WAN22BlockSwapLoader"] = "WAN BlockSwap Model Loader"


LOOPER_CATEGORY = "ComfyUI_Wan22Blockswap/looper"


class WAN22BlockSwapLooperModels:
    DESCRIPTION = (
        "Block swapping for a WAN 2.2 high-noise / low-noise pair, e.g. for WanVideoLooper. The two experts "
        "take turns in VRAM: before one samples, ComfyUI unloads the other's resident blocks, so each can keep "
        "as many blocks resident as the whole VRAM allows. Host copies are made once per expert and kept "
        "across segments. Returns clones; the inputs are unchanged."
    )
    CATEGORY = LOOPER_CATEGORY
    RETURN_TYPES = ("MODEL", "MODEL")
    RETURN_NAMES = ("model_high", "model_low")
    OUTPUT_TOOLTIPS = (
        "The high-noise expert with block swapping.",
        "The low-noise expert with block swapping.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return swap_node_inputs(
            {
                "model_high": ("MODEL", {"tooltip": "The WAN 2.2 high-noise expert (from any loader)."}),
                "model_low": ("MODEL", {"tooltip": "The WAN 2.2 low-noise expert (from any loader)."}),
            }
        )

    def apply(self, model_high, model_low, **settings):
        return looper.swap_pair(model_high, model_low, SwapConfig(**settings))


class WAN22BlockSwapSequencer:
    DESCRIPTION = (
        "Block swapping for every model of a WanVideo Lora Sequencer output: the same list, each model "
        "replaced by its swapped clone, clips and empty entries untouched. Models that share a base model "
        "(LoRA clones) share one set of host copies; high and low experts take turns in VRAM."
    )
    CATEGORY = LOOPER_CATEGORY
    RETURN_TYPES = ("ANY",)  # WanVideoLooper matches the literal type name "ANY"
    RETURN_NAMES = ("model_clip_sequence",)
    OUTPUT_TOOLTIPS = ("Connect to WanVideoLooper's model_clip_sequence input.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return swap_node_inputs(
            {
                "model_clip_sequence": (
                    "ANY",
                    {
                        "forceInput": True,
                        "tooltip": "The output of WanVideo Lora Sequencer: a list of (model_high, model_low, clip) "
                        "entries, any of them empty.",
                    },
                ),
            }
        )

    def apply(self, model_clip_sequence, **settings):
        return (looper.swap_sequence(model_clip_sequence, SwapConfig(**settings)),)


NODE_CLASS_MAPPINGS["wan22BlockSwapLooperModels"] = WAN22BlockSwapLooperModels
NODE_DISPLAY_NAME_MAPPINGS["wan22BlockSwapLooperModels"] = "WAN22 BlockSwap Looper Models"
NODE_CLASS_MAPPINGS["wan22BlockSwapSequencer"] = WAN22BlockSwapSequencer
NODE_DISPLAY_NAME_MAPPINGS["wan22BlockSwapSequencer"] = "WAN22 BlockSwap Sequencer"

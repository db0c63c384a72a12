"""Writes example_workflows/*.json from the node definitions of a live ComfyUI server.

    python scripts/make_example_workflows.py [--comfyui PATH] [--check]

Starts `main.py --cpu` of the ComfyUI checkout (default: $WAN22_COMFYUI, else $HOME/comfy-hosts/0.33)
with this pack and WanVideoLooper installed (tests/host/comfy_server.py), reads /object_info, and lays
out every node's widgets_values from the inputs as the server lists them (input_order), the way the
frontend saves them: one value per widget input, a control_after_generate value after every seed, the
upload widget's value after an image upload combo. Each example below names only the values it
changes; every other widget gets its default. So when a node gains an input (e.g. an optional
auto_blocks_to_swap as the last input of the BlockSwap nodes), re-running this script puts it in the
right place. --check compares instead of writing (exit 1 when a file differs).

The host tests (tests/host/host_server.py) build the same workflows from their own server's
/object_info and compare them with the committed files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
DEFAULT_CHECKOUT = Path.home() / "comfy-hosts" / "0.33"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a control_after_generate widget after these
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# Widgets a pack's own frontend script adds after the definition's (the frontend saves them too):
# WanVideoLooper's js/wan_prompts_node.js adds a profile name, three buttons, a profile list and a button.
FRONTEND_EXTRA_VALUES = {"WanVideoLooperPrompts": ["", None, None, None, "", None]}
CARD = "a 12 GB card (e.g. RTX 3060 12 GB or RTX 4070)"
# Layout: the frontend draws a node's title bar above its pos (LiteGraph's NODE_TITLE_HEIGHT), so a node's box
# is [x, y - TITLE_H, width, height + TITLE_H]. Nodes are stacked in columns with GAP between boxes.
TITLE_H = 30
GAP = 40
NOTE_WIDTH = 440

# --- the widget layout the frontend saves -------------------------------------------------------------


def _spec(info: dict, name: str) -> tuple[object, dict]:
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            spec = info["input"][section][name]
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    raise KeyError(name)


def ordered_inputs(info: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, optional) of every input, in the server's input_order."""
    out = []
    for section in ("required", "optional"):
        names = info.get("input_order", {}).get(section, list(info["input"].get(section, {})))
        for name in names:
            type_, options = _spec(info, name)
            out.append((name, type_, options, section == "optional"))
    return out


def is_widget(type_: object, options: dict) -> bool:
    return not options.get("forceInput") and (isinstance(type_, list) or type_ in WIDGET_TYPES)


def widget_layout(info: dict) -> list[tuple[str, str]]:
    """The node's widgets_values slots: (input name, kind), kind "value", "control" or "upload"."""
    slots = []
    for name, type_, options, _ in ordered_inputs(info):
        if not is_widget(type_, options):
            continue
        slots.append((name, "value"))
        if options.get("control_after_generate") or (type_ == "INT" and name in SEED_NAMES):
            slots.append((name, "control"))
        if options.get("image_upload"):
            slots.append((name, "upload"))
    return slots


def _default(name: str, type_: object, options: dict) -> object:
    if "default" in options:
        return options["default"]
    if isinstance(type_, list):
        return type_[0] if type_ else ""
    if type_ == "COMBO":
        return options.get("options", [""])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[type_]


# --- a workflow in the frontend's saved format -------------------------------------------------------


class Graph:
    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(
        self, kind: str, pos, values: dict | None = None, *, title=None, size=None, widget_inputs=()
    ) -> dict:
        """A node of `kind` with the named widget values (others: defaults). Unknown names are an error.

        widget_inputs: widgets turned into sockets (to link another node's output into them).
        """
        values = dict(values or {})
        info = self.info[kind]
        node_id = len(self.nodes) + 1
        # Sockets first (widgets turned into sockets among them), then the widget inputs: as the frontend saves.
        sockets, widget_entries, multiline = [], [], 0
        for name, type_, options, optional in ordered_inputs(info):
            if is_widget(type_, options):
                wtype = "COMBO" if isinstance(type_, list) else type_
                entry = {"name": name, "type": wtype, "widget": {"name": name}, "link": None}
                (sockets if name in widget_inputs else widget_entries).append(entry)
                multiline += type_ == "STRING" and bool(options.get("multiline"))
            else:
                socket = {"name": name, "type": type_ if isinstance(type_, str) else "COMBO", "link": None}
                if optional:
                    socket["shape"] = 7
                sockets.append(socket)
        inputs = sockets + widget_entries
        widget_values = []
        for name, kind_ in widget_layout(info):
            type_, options = _spec(info, name)
            if kind_ == "value":
                value = values.pop(name, _default(name, type_, options))
                choices = type_ if isinstance(type_, list) else options.get("options")
                if choices is not None and value not in choices and not _is_file_name(value):
                    raise ValueError(f"{kind}.{name}: {value!r} is not one of {choices[:10]}")
                widget_values.append(value)
            elif kind_ == "control":
                widget_values.append(values.pop("control_after_generate", "fixed"))
            else:
                widget_values.append("image")
        widget_values += FRONTEND_EXTRA_VALUES.get(kind, [])
        if values:
            raise KeyError(f"{kind} has no widget input(s) {sorted(values)}; it has {widget_layout(info)}")
        outputs = [
            {"name": name, "type": type_, "slot_index": i, "links": []}
            for i, (name, type_) in enumerate(zip(info["output_name"], info["output"], strict=True))
        ]
        height = 30 + 22 * max(len(sockets), len(outputs)) + 26 * len(widget_values) + 80 * multiline
        node = {
            "id": node_id,
            "type": kind,
            "pos": list(pos),
            "size": list(size or [340, height]),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": kind},
            "widgets_values": widget_values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, pos, text: str, size=(440, 420)) -> dict:
        node = {
            "id": len(self.nodes) + 1,
            "type": "Note",
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [text],
            "color": "#432",
            "bgcolor": "#653",
        }
        self.nodes.append(node)
        return node

    def connect(self, src: dict, output: str | int, dst: dict, input_name: str) -> None:
        out_index = output if isinstance(output, int) else [o["name"] for o in src["outputs"]].index(output)
        (in_index,) = [i for i, s in enumerate(dst["inputs"]) if s["name"] == input_name]
        link_id = len(self.links) + 1
        type_ = src["outputs"][out_index]["type"]
        src["outputs"][out_index]["links"].append(link_id)
        dst["inputs"][in_index]["link"] = link_id
        self.links.append([link_id, src["id"], out_index, dst["id"], in_index, type_])

    def workflow(self, uid: str) -> dict:
        overlapping = overlaps(self.nodes)
        if overlapping:
            raise ValueError(f"overlapping nodes in {uid}: {overlapping}")
        order = self._execution_order()
        for node in self.nodes:
            node["order"] = order[node["id"]]
            for out in node["outputs"]:
                if not out["links"]:
                    out["links"] = None if out["name"] == "MASK" else []
        for node in self.nodes:
            # A save node's unlinked outputs are left out: ComfyUI 0.33's SaveAnimatedWEBP lists an output
            # that older versions do not have; the frontend adds it from the definition when it loads.
            if self.info.get(node["type"], {}).get("output_node") and not any(
                o["links"] for o in node["outputs"]
            ):
                node["outputs"] = []
        return {
            "id": uid,
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}},
            "version": 0.4,
        }

    def _execution_order(self) -> dict[int, int]:
        incoming = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n["id"] for n in self.nodes if n["id"] not in done and incoming[n["id"]] <= done]
            for node_id in ready:
                order[node_id] = len(order)
            done.update(ready)
        return order


class Column:
    """Nodes stacked top to bottom at one x, each box GAP below the previous one (title bars included), so
    a node that grows (a new input) pushes the ones below it down instead of overlapping them."""

    def __init__(self, g: Graph, x: float, y: float = 0):
        self.g, self.x, self.y, self.width = g, x, y, 0

    def node(self, kind: str, values: dict | None = None, **options) -> dict:
        return self._placed(self.g.node(kind, (self.x, self.y), values, **options))

    def note(self, text: str, height: int = 420) -> dict:
        return self._placed(self.g.note((self.x, self.y), text, size=(NOTE_WIDTH, height)))

    def _placed(self, node: dict) -> dict:
        self.y = node["pos"][1] + node["size"][1] + TITLE_H + GAP
        self.width = max(self.width, node["size"][0])
        return node

    def next(self, y: float = 0) -> Column:
        """The column to the right of this one."""
        return Column(self.g, self.x + self.width + GAP, y)


def note_column(g: Graph) -> Column:
    """The column left of x=0 where each example's Note goes."""
    return Column(g, -NOTE_WIDTH - GAP)


def box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the node as the frontend draws it, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlaps(nodes: list[dict]) -> list[tuple[int, int]]:
    """Pairs of node ids whose boxes overlap."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            (l1, t1, r1, b1), (l2, t2, r2, b2) = box(a), box(b)
            if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1:
                out.append((a["id"], b["id"]))
    return out


def _is_file_name(value: object) -> bool:
    return isinstance(value, str) and value.endswith((".safetensors", ".gguf", ".png", ".jpg"))


# --- shared pieces ---------------------------------------------------------------------------------------

SWAP_OVERLAP = {"use_non_blocking": True, "prefetch_blocks": 1}
POSITIVE = (
    "a red fox trotting through fresh snow in a pine forest at sunrise, soft golden light, "
    "the camera tracks alongside it"
)
NEGATIVE = (
    "blurry, low quality, worst quality, jpeg artifacts, static frame, watermark, subtitles, deformed, "
    "extra fingers, oversaturated"
)
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
REPACK_21 = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
REPACK_22 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
COMMON_FILES = (
    f"- text_encoders: {TEXT_ENCODER} ({REPACK_21}, split_files/text_encoders)\n"
    f"- vae: {VAE} ({REPACK_21}, split_files/vae)"
)
OVERLAP_NOTE = (
    "use_non_blocking + prefetch_blocks 1: pinned RAM and the next block copied while the current one "
    "computes. Raise blocks_to_swap if sampling or the VAE decode runs out of VRAM, lower it if VRAM is left "
    "over. The sizes here are computed from the block shapes; the settings are starting points, not "
    "measured on such a card."
)


def text_nodes(g: Graph, clip_col: Column, prompt_col: Column | None = None):
    """Text encoder in `clip_col`, the two prompts below each other in `prompt_col` (default: the column right of
    the text encoder)."""
    clip = clip_col.node("CLIPLoader", {"clip_name": TEXT_ENCODER, "type": "wan"})
    prompt_col = prompt_col or clip_col.next(clip["pos"][1])
    pos = prompt_col.node("CLIPTextEncode", {"text": POSITIVE}, title="Positive prompt")
    neg = prompt_col.node("CLIPTextEncode", {"text": NEGATIVE}, title="Negative prompt")
    g.connect(clip, "CLIP", pos, "clip")
    g.connect(clip, "CLIP", neg, "clip")
    return prompt_col, pos, neg


def decode_and_save(g: Graph, latent_src: dict, latent_output, col: Column, prefix: str) -> dict:
    """VAE Loader and VAE Decode in `col`, Save Animated WEBP in the column right of it."""
    vae = col.node("VAELoader", {"vae_name": VAE})
    decode = col.node("VAEDecode")
    g.connect(latent_src, latent_output, decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    save = col.next().node("SaveAnimatedWEBP", {"filename_prefix": prefix, "fps": 16.0}, size=[420, 460])
    g.connect(decode, "IMAGE", save, "images")
    return vae


def text_to_video(g: Graph, model_src: dict, model_output, col: Column, prefix: str) -> None:
    """Prompts, an 832x480x33 latent, KSampler (30 steps uni_pc, cfg 6) and decode + save, from column col."""
    prompts, pos, neg = text_nodes(g, col)
    latent = col.node("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33})
    sampler_col = prompts.next()
    sampler = sampler_col.node(
        "KSampler",
        {"seed": 123456789, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"},
    )
    for src, out, name in ((model_src, model_output, "model"), (pos, 0, "positive"), (neg, 0, "negative")):
        g.connect(src, out, sampler, name)
    g.connect(latent, "LATENT", sampler, "latent_image")
    decode_and_save(g, sampler, "LATENT", sampler_col.next(), prefix)


# --- the examples ----------------------------------------------------------------------------------------


def t2v(info: dict) -> dict:
    g = Graph(info)
    models = Column(g, 0)
    unet = models.node("UNETLoader", {"unet_name": "wan2.1_t2v_14B_fp8_scaled.safetensors"})
    swap = models.node("wan22BlockSwap", {"blocks_to_swap": 25, **SWAP_OVERLAP})
    g.connect(unet, "MODEL", swap, "model")
    shift = models.node("ModelSamplingSD3", {"shift": 8.0})
    g.connect(swap, "model", shift, "model")
    text_to_video(g, shift, "MODEL", models.next(), "wan22_blockswap/t2v")
    note_column(g).note(
        "WAN 2.2 BlockSwap example: text to video (WAN 2.1 T2V 14B, fp8).\n\n"
        "File: wan22_blockswap_t2v.json. Model files (ComfyUI/models/...), as Comfy-Org's repackaged "
        "release names them:\n"
        f"- diffusion_models: wan2.1_t2v_14B_fp8_scaled.safetensors ({REPACK_21}, split_files/diffusion_models)\n"
        f"{COMMON_FILES}\n\n"
        f"Settings for {CARD}: the model has 40 blocks of about 351 MB in fp8 (14 GB); blocks_to_swap 25 "
        "keeps 15 of them (about 5.3 GB) in VRAM and 25 (about 8.8 GB) in CPU RAM. "
        f"{OVERLAP_NOTE}\n\n"
        "For WAN 2.1 T2V 1.3B (wan2.1_t2v_1.3B_fp16.safetensors, 30 blocks of 93 MB) a 12 GB card needs "
        "little or no swapping: start with blocks_to_swap 0-10.",
    )
    return g.workflow("5b0f3c1e-8d2a-4f6e-9c47-2a1d7e0b9f31")


def i2v(info: dict) -> dict:
    g = Graph(info)
    models = Column(g, 0)
    unet = models.node(
        "UNETLoader",
        {"unet_name": "wan2.1_i2v_480p_14B_fp16.safetensors", "weight_dtype": "fp8_e4m3fn"},
    )
    swap = models.node("wan22BlockSwap", {"blocks_to_swap": 30, "offload_img_emb": True, **SWAP_OVERLAP})
    g.connect(unet, "MODEL", swap, "model")
    shift = models.node("ModelSamplingSD3", {"shift": 8.0})
    g.connect(swap, "model", shift, "model")
    loaders = models.next()
    encoders, pos, neg = text_nodes(g, loaders)
    vision = loaders.node("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"})
    image = loaders.node("LoadImage", {"image": "start_frame.png"}, title="Start image", size=[340, 320])
    encode = encoders.node("CLIPVisionEncode", {"crop": "none"})
    g.connect(vision, "CLIP_VISION", encode, "clip_vision")
    g.connect(image, "IMAGE", encode, "image")
    vae = encoders.node("VAELoader", {"vae_name": VAE})
    sampling = encoders.next()
    i2v_node = sampling.node("WanImageToVideo", {"width": 832, "height": 480, "length": 33})
    for src, out, name in (
        (pos, 0, "positive"),
        (neg, 0, "negative"),
        (vae, "VAE", "vae"),
        (encode, 0, "clip_vision_output"),
        (image, "IMAGE", "start_image"),
    ):
        g.connect(src, out, i2v_node, name)
    sampler = sampling.node(
        "KSampler",
        {"seed": 123456789, "steps": 20, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"},
    )
    g.connect(shift, "MODEL", sampler, "model")
    g.connect(i2v_node, "positive", sampler, "positive")
    g.connect(i2v_node, "negative", sampler, "negative")
    g.connect(i2v_node, "latent", sampler, "latent_image")
    decoding = sampling.next()
    decode = decoding.node("VAEDecode")
    g.connect(sampler, "LATENT", decode, "samples")
    g.connect(vae, "VAE", decode, "vae")
    save = decoding.next().node(
        "SaveAnimatedWEBP", {"filename_prefix": "wan22_blockswap/i2v", "fps": 16.0}, size=[420, 460]
    )
    g.connect(decode, "IMAGE", save, "images")
    note_column(g).note(
        "WAN 2.2 BlockSwap example: image to video (WAN 2.1 I2V 480p 14B).\n\n"
        "File: wan22_blockswap_i2v.json. Model files (ComfyUI/models/...), as Comfy-Org's repackaged "
        "release names them:\n"
        f"- diffusion_models: wan2.1_i2v_480p_14B_fp16.safetensors ({REPACK_21}, split_files/diffusion_models)\n"
        f"- clip_vision: clip_vision_h.safetensors ({REPACK_21}, split_files/clip_vision)\n"
        f"{COMMON_FILES}\n"
        "- input: your start image (start_frame.png here)\n\n"
        f"Settings for {CARD}: Load Diffusion Model stores the fp16 file as fp8 (weight_dtype fp8_e4m3fn), "
        "40 blocks of about 404 MB; blocks_to_swap 30 keeps 10 (about 4 GB) in VRAM and 30 (about 12 GB) "
        "in CPU RAM; offload_img_emb streams the CLIP image embedding too. "
        f"{OVERLAP_NOTE}",
    )
    return g.workflow("0c6e4a52-91d3-4b7e-a1f0-7d3c2b9e5a14")


A14B_GGUF = ("Wan2.2-T2V-A14B-HighNoise-Q5_K_M.gguf", "Wan2.2-T2V-A14B-LowNoise-Q5_K_M.gguf")
A14B_LORAS = (
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
)


def a14b_gguf(info: dict) -> dict:
    g = Graph(info)
    experts, y = [], 0
    for role, gguf, lora_name in zip(("high", "low"), A14B_GGUF, A14B_LORAS, strict=True):
        loaders = Column(g, 0, y)
        loader = loaders.node(
            "WANModelLoader",
            {
                "model_type": "gguf",
                "safetensors_model": "none",  # the format not in use
                "gguf_model": gguf,
                "wan_version": "2.2",
                "model_variant": "t2v",
            },
            title=f"Load {role}-noise expert (GGUF)",
        )
        patches = loaders.next(y)
        lora = patches.node("LoraLoaderModelOnly", {"lora_name": lora_name, "strength_model": 1.0})
        g.connect(loader, "model", lora, "model")
        shift = patches.node("ModelSamplingSD3", {"shift": 5.0})
        g.connect(lora, "MODEL", shift, "model")
        swaps = patches.next(y)
        swap = swaps.node(
            "wan22BlockSwap", {"blocks_to_swap": 20, **SWAP_OVERLAP}, title=f"BlockSwap ({role})"
        )
        g.connect(shift, "MODEL", swap, "model")
        experts.append(swap)
        y = max(loaders.y, patches.y, swaps.y)
    prompts, pos, neg = text_nodes(g, Column(g, 0, y))
    latent = prompts.next(y).node("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81})
    common = {"steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
    samplers = swaps.next()
    high = samplers.node(
        "KSamplerAdvanced",
        {
            "add_noise": "enable",
            "noise_seed": 123456789,
            **common,
            "start_at_step": 0,
            "end_at_step": 4,
            "return_with_leftover_noise": "enable",
        },
        title="KSampler (high noise, steps 0-4)",
    )
    low = samplers.node(
        "KSamplerAdvanced",
        {
            "add_noise": "disable",
            "noise_seed": 0,
            **common,
            "start_at_step": 4,
            "end_at_step": 8,
            "return_with_leftover_noise": "disable",
        },
        title="KSampler (low noise, steps 4-8)",
    )
    for sampler, swap in ((high, experts[0]), (low, experts[1])):
        g.connect(swap, "model", sampler, "model")
        g.connect(pos, 0, sampler, "positive")
        g.connect(neg, 0, sampler, "negative")
    g.connect(latent, "LATENT", high, "latent_image")
    g.connect(high, "LATENT", low, "latent_image")
    decode_and_save(g, low, "LATENT", samplers.next(), "wan22_blockswap/a14b")
    note_column(g).note(
        "WAN 2.2 A14B text to video, high- and low-noise experts as GGUF (Q5_K_M) through WAN Model Loader, "
        "each with the LightX2V 4-step distill LoRA and its own WAN 2.2 BlockSwap; 8 steps, cfg 1: steps 0-4 "
        "on the high-noise expert, 4-8 on the low-noise one.\n\n"
        "File: wan22_a14b_t2v_gguf_lightx2v.json. Model files (ComfyUI/models/...):\n"
        f"- diffusion_models: {A14B_GGUF[0]} and {A14B_GGUF[1]} (QuantStack/Wan2.2-T2V-A14B-GGUF, folders "
        "HighNoise/ and LowNoise/)\n"
        f"- loras: {A14B_LORAS[0]} and {A14B_LORAS[1]} ({REPACK_22}, split_files/loras)\n"
        f"{COMMON_FILES}\n\n"
        f"Settings for {CARD}: each expert has 40 blocks; Q5_K_M keeps them quantized in RAM and VRAM (about "
        "a third of bf16's 703 MB per block). blocks_to_swap 20 keeps half of each expert's blocks in VRAM; "
        "ComfyUI unloads the high-noise expert before the low-noise one needs the room. The LoRA is applied "
        f"to the GGUF weights after they are dequantized. {OVERLAP_NOTE}\n\n"
        "WAN 2.2 BlockSwap Looper Models swaps both experts with one node: see wan22_looper_high_low.json.",
        height=520,
    )
    return g.workflow("8e2d41b7-5c3a-4f09-b6d2-1a7e9c0f3b58")


def gguf(info: dict) -> dict:
    g = Graph(info)
    models = Column(g, 0)
    loader = models.node(
        "WANModelLoader",
        {"model_type": "gguf", "safetensors_model": "none", "gguf_model": "wan2.1-t2v-14b-Q5_K_M.gguf"},
        title="WAN Model Loader (GGUF)",
    )
    swap = models.node("wan22BlockSwap", {"blocks_to_swap": 20, **SWAP_OVERLAP})
    g.connect(loader, "model", swap, "model")
    text_to_video(g, swap, "model", models.next(), "wan22_blockswap/gguf")
    note_column(g).note(
        "A GGUF WAN model through WAN Model Loader (no other GGUF node pack needed), then WAN 2.2 BlockSwap: "
        "text to video with WAN 2.1 T2V 14B in Q5_K_M.\n\n"
        "File: wan22_gguf_t2v.json. Model files (ComfyUI/models/...):\n"
        "- diffusion_models: wan2.1-t2v-14b-Q5_K_M.gguf (city96/Wan2.1-T2V-14B-gguf)\n"
        f"{COMMON_FILES}\n\n"
        "WAN Model Loader reads the file memory-mapped; weights stay quantized and are dequantized per layer "
        "on the GPU. wan_version and model_variant on auto read both from the weights; fp8_optimization and "
        "weight_dtype do not apply to GGUF.\n\n"
        f"Settings for {CARD}: 40 blocks, about a third of bf16's 703 MB each in Q5_K_M; blocks_to_swap 20 "
        f"keeps half of them in VRAM. {OVERLAP_NOTE}",
    )
    return g.workflow("3f71c9d2-0b4e-4a86-9e15-c2d8a6b0f447")


LOOPER_I2V = (
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
)
LOOPER_LORAS = (
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
)
LOOPER_PROMPTS = (
    "a red fox trots out of a pine forest onto fresh snow\n"
    "the fox stops and looks around, breath steaming in the cold air\n"
    "the fox runs across the snowy field towards the sunrise"
)
NEEDS_LOOPER = (
    "NEEDS the WanVideoLooper custom node pack (nodes WanVideoLooper, WanVideoLooperPrompts, "
    "WanVideoLoraSequencer); install it first, or ComfyUI reports those nodes as missing."
)


def _looper_common(g: Graph, inputs: Column, prompt_col: Column, steps: int, cfg: float):
    """Text encoder, VAE and start image below `inputs`, the prompts below `prompt_col`, then the looper and
    the save node in the columns right of `prompt_col`."""
    clip = inputs.node("CLIPLoader", {"clip_name": TEXT_ENCODER, "type": "wan"})
    vae = inputs.node("VAELoader", {"vae_name": VAE})
    image = inputs.node("LoadImage", {"image": "start_frame.png"}, title="Start image", size=[340, 320])
    prompts = prompt_col.node(
        "WanVideoLooperPrompts", {"prompts": LOOPER_PROMPTS, "negative_prompt": NEGATIVE}
    )
    looper_col = prompt_col.next()
    looper = looper_col.node(
        "WanVideoLooper",
        {
            "seed": 123456789,
            "steps": steps,
            "cfg_motion_noise": cfg,
            "cfg_noise": cfg,
            "sampler_name": "euler",
        },
        widget_inputs=("negative_prompt",),
        size=[420, 760],
    )
    g.connect(clip, "CLIP", looper, "clip")
    g.connect(vae, "VAE", looper, "vae")
    g.connect(image, "IMAGE", looper, "start_image")
    g.connect(prompts, "prompt_list", looper, "positive_prompts")
    g.connect(prompts, "negative_prompt", looper, "negative_prompt")
    save = looper_col.next().node(
        "SaveAnimatedWEBP", {"filename_prefix": "wan22_blockswap/looper", "fps": 16.0}, size=[420, 460]
    )
    g.connect(looper, "images", save, "images")
    return looper


def looper_high_low(info: dict) -> dict:
    g = Graph(info)
    inputs = Column(g, 0)
    high = inputs.node("UNETLoader", {"unet_name": LOOPER_I2V[0]}, title="Load high-noise expert")
    low = inputs.node("UNETLoader", {"unet_name": LOOPER_I2V[1]}, title="Load low-noise expert")
    swaps = inputs.next()
    pair = swaps.node("wan22BlockSwapLooperModels", {"blocks_to_swap": 20, **SWAP_OVERLAP})
    g.connect(high, "MODEL", pair, "model_high")
    g.connect(low, "MODEL", pair, "model_low")
    looper = _looper_common(g, inputs, swaps, steps=6, cfg=1.0)
    g.connect(pair, "model_high", looper, "model_high")
    g.connect(pair, "model_low", looper, "model_low")
    note_column(g).note(
        "WAN 2.2 A14B image to video in a loop with WanVideoLooper and WAN22 BlockSwap Looper Models "
        "(one node swaps both experts).\n" + NEEDS_LOOPER + "\n\n"
        "File: wan22_looper_high_low.json. Model files (ComfyUI/models/...), as Comfy-Org's repackaged "
        "release names them:\n"
        f"- diffusion_models: {LOOPER_I2V[0]} and {LOOPER_I2V[1]} ({REPACK_22}, split_files/diffusion_models)\n"
        f"{COMMON_FILES}\n"
        "- input: your start frame (start_frame.png here)\n\n"
        f"Settings for {CARD}: the experts take turns in VRAM (ComfyUI unloads the one not sampling), so each "
        "can keep as many blocks resident as the card allows. These fp8 experts have 40 blocks of about "
        f"351 MB (14 GB): blocks_to_swap 20 keeps about 7 GB of blocks in VRAM. {OVERLAP_NOTE}",
    )
    return g.workflow("5b9f1d7e-2f7b-4a8e-9c61-0a22100e0001")


def looper_sequencer(info: dict) -> dict:
    g = Graph(info)
    inputs = Column(g, 0)
    high = inputs.node("UNETLoader", {"unet_name": LOOPER_I2V[0]}, title="Load high-noise expert")
    low = inputs.node("UNETLoader", {"unet_name": LOOPER_I2V[1]}, title="Load low-noise expert")
    models = inputs.next()
    pair = models.node("wan22BlockSwapLooperModels", {"blocks_to_swap": 20, **SWAP_OVERLAP})
    g.connect(high, "MODEL", pair, "model_high")
    g.connect(low, "MODEL", pair, "model_low")
    lora_high = models.node(
        "LoraLoaderModelOnly", {"lora_name": LOOPER_LORAS[0], "strength_model": 1.0}, title="Segment 2: high"
    )
    lora_low = models.node(
        "LoraLoaderModelOnly", {"lora_name": LOOPER_LORAS[1], "strength_model": 1.0}, title="Segment 2: low"
    )
    g.connect(high, "MODEL", lora_high, "model")
    g.connect(low, "MODEL", lora_low, "model")
    sequence = models.next()
    sequencer = sequence.node("WanVideoLoraSequencer", size=[340, 300])
    g.connect(lora_high, "MODEL", sequencer, "model_high_2")
    g.connect(lora_low, "MODEL", sequencer, "model_low_2")
    swap_seq = sequence.node("wan22BlockSwapSequencer", {"blocks_to_swap": 20, **SWAP_OVERLAP})
    g.connect(sequencer, "model_clip_sequence", swap_seq, "model_clip_sequence")
    looper = _looper_common(g, inputs, sequence, steps=6, cfg=1.0)
    g.connect(pair, "model_high", looper, "model_high")
    g.connect(pair, "model_low", looper, "model_low")
    g.connect(swap_seq, "model_clip_sequence", looper, "model_clip_sequence")
    note_column(g).note(
        "WAN 2.2 A14B image to video in a loop with WanVideoLooper, a different LoRA per segment through "
        "WanVideo Looper Lora Sequencer, and WAN22 BlockSwap Sequencer swapping every model of the sequence.\n"
        + NEEDS_LOOPER
        + "\n\nFile: wan22_looper_sequencer.json. Model files (ComfyUI/models/...):\n"
        f"- diffusion_models: {LOOPER_I2V[0]} and {LOOPER_I2V[1]} ({REPACK_22}, split_files/diffusion_models)\n"
        f"- loras: {LOOPER_LORAS[0]} and {LOOPER_LORAS[1]} ({REPACK_22}, split_files/loras)\n"
        f"{COMMON_FILES}\n"
        "- input: your start frame (start_frame.png here)\n\n"
        "Segment 2 (the second prompt line) samples with the LightX2V LoRA on both experts; segments without "
        "an entry use the base experts, swapped by Looper Models. Put another LoRA (or strength) on a "
        "segment by connecting it to that segment's model_high_N / model_low_N. The Sequencer's LoRA clones "
        "share the base experts' host copies, so RAM holds each expert's swapped blocks once.\n\n"
        f"Settings for {CARD}: as in wan22_looper_high_low.json, blocks_to_swap 20 of 40 (about 7 GB of "
        f"fp8 blocks resident). {OVERLAP_NOTE}",
        height=560,
    )
    return g.workflow("c4a8e2f6-7d19-4b3a-8e5c-0a22100e0002")


def combined_loader(info: dict) -> dict:
    g = Graph(info)
    models = Column(g, 0)
    loader = models.node(
        "WAN22BlockSwapLoader",
        {
            "model_type": "safetensors",
            "safetensors_model": "wan2.1_t2v_14B_fp8_scaled.safetensors",
            "gguf_model": "none",
            "auto_blocks_to_swap": True,
            **SWAP_OVERLAP,
        },
        size=[400, 520],
    )
    shift = models.node("ModelSamplingSD3", {"shift": 8.0})
    g.connect(loader, "model", shift, "model")
    text_to_video(g, shift, "MODEL", models.next(), "wan22_blockswap/loader")
    note_column(g).note(
        "WAN BlockSwap Model Loader example: the loader and BlockSwap in one node, text to video with WAN 2.1 "
        "T2V 14B (fp8_scaled).\n\n"
        "File: wan22_blockswap_loader.json. Model files (ComfyUI/models/...), as Comfy-Org's repackaged "
        "release names them:\n"
        f"- diffusion_models: wan2.1_t2v_14B_fp8_scaled.safetensors ({REPACK_21}, split_files/diffusion_models)\n"
        f"{COMMON_FILES}\n\n"
        "The node reads each swapped block from the file straight into its host copy in CPU RAM; the other "
        "weights go where ComfyUI's own load puts them. auto_blocks_to_swap is on: at every load the fewest "
        "last blocks are swapped whose resident weights plus the prefetch slots fit the VRAM ComfyUI grants "
        "(none when the whole model fits); blocks_to_swap is then not used. "
        f"For {CARD}: 40 blocks of about 351 MB in fp8 (14 GB) do not all fit, so part of them is swapped; "
        "the log names the plan and, on a GPU, its measured copy and compute time after the first run. "
        f"{OVERLAP_NOTE}",
    )
    return g.workflow("9d2e6b14-3c7a-4f08-b5e1-6a0c4d8f2e73")


EXAMPLES = {
    "wan22_blockswap_t2v.json": (t2v, ()),
    "wan22_blockswap_i2v.json": (i2v, ()),
    "wan22_a14b_t2v_gguf_lightx2v.json": (a14b_gguf, ()),
    "wan22_gguf_t2v.json": (gguf, ()),
    "wan22_blockswap_loader.json": (combined_loader, ()),
    "wan22_looper_high_low.json": (looper_high_low, ("WanVideoLooper",)),
    "wan22_looper_sequencer.json": (looper_sequencer, ("WanVideoLooper", "WanVideoLoraSequencer")),
}


def build_workflows(object_info: dict) -> dict[str, dict]:
    """Every example whose nodes the server lists, by file name."""
    out = {}
    for name, (build, needs) in EXAMPLES.items():
        if all(kind in object_info for kind in needs):
            out[name] = build(object_info)
    return out


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def _load_comfy_server():
    path = ROOT / "tests" / "host" / "comfy_server.py"
    spec = importlib.util.spec_from_file_location("_wan22_comfy_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--comfyui", type=Path, default=Path(os.environ.get("WAN22_COMFYUI") or DEFAULT_CHECKOUT)
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args(argv)
    comfy_server = _load_comfy_server()
    with tempfile.TemporaryDirectory(prefix="wan22_examples_") as tmp:
        with comfy_server.running_server(args.comfyui.resolve(), Path(tmp)) as srv:
            object_info = srv.get("/object_info")
    workflows = build_workflows(object_info)
    missing = [name for name in EXAMPLES if name not in workflows]
    if missing:
        print(f"not built (their node packs are not installed): {missing}", file=sys.stderr)
        return 1
    differ = []
    for name, workflow in workflows.items():
        path = args.out / name
        text = dumps(workflow)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                differ.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if differ:
        print(f"differ from the generated workflows: {differ}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

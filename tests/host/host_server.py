"""The pack inside a real ComfyUI server of the checkout under test (WAN22_COMFYUI), over HTTP.

One server per module: `main.py --cpu` listening on 127.0.0.1 only, on a free port, with a temporary
base directory whose custom_nodes/ holds this repository (as the pack users install) and a test-only
node package (tests/host/server_nodes: random WAN text conditioning, since WAN's text encoder has no
test-size version), and whose models/diffusion_models/ holds a tiny WAN 2.1 t2v checkpoint.

Checks: the node as the server lists it (/object_info); a prompt UNETLoader -> WAN 2.2 BlockSwap ->
KSampler -> SaveLatent queued with /prompt, run to success and saved, with the same result as an
unswapped sampling in this process; a clean server log; and example_workflows/*.json against the
live server's node definitions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import comfy.model_management
import pytest
import torch
from safetensors.torch import load_file

from .comfy_helpers import load, sample, write_checkpoint
from .comfy_server import (
    CFG,
    FRAMES,
    HOST,
    LOOPER,
    PACK_DIR,
    SEED,
    SIZE,
    STEPS,
    TEST_NODES_DIR,
    ServerError,
    running_server,
    sample_and_save,
)

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = Path(os.environ["WAN22_COMFYUI"]).resolve()


def _generator():
    path = ROOT / "scripts" / "make_example_workflows.py"
    spec = importlib.util.spec_from_file_location("_wan22_examples", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GEN = _generator()
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
PROMPT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_server")

    def models(base):
        write_checkpoint(base / "models" / "diffusion_models", "t2v")  # tiny_wan_t2v.safetensors

    try:
        with running_server(CHECKOUT, root, prepare=models) as srv:
            print(f"\nComfyUI {CHECKOUT.name} server up in {srv.start_seconds:.1f} s on {srv.url}")
            yield srv
    except ServerError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


# --- (a) the node as the server lists it ----------------------------------------------------------

EXPECTED_INPUTS = {
    "required": {
        "model": ("MODEL", None),
        "blocks_to_swap": ("INT", 20),
        "offload_txt_emb": ("BOOLEAN", False),
        "offload_img_emb": ("BOOLEAN", False),
    },
    "optional": {
        "use_non_blocking": ("BOOLEAN", False),
        "vace_blocks_to_swap": ("INT", 0),
        "prefetch_blocks": ("INT", 0),
        "block_swap_debug": ("BOOLEAN", False),
        "override_dynamic_vram": ("BOOLEAN", False),
        "auto_blocks_to_swap": ("BOOLEAN", False),
        "host_memory": (["auto", "ram", "file"], "auto"),
    },
}


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net shows them) of the sockets listening on `port` (Linux)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.isfile(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def test_server_listens_on_loopback_only(server):
    assert server.proc.poll() is None
    assert f"To see the GUI go to: http://{HOST}:{server.port}" in server.log(), server.tail()
    if not os.path.isfile("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert _listening_addresses(server.port) == ["0100007F"]  # 127.0.0.1, and nothing else


def test_server_lists_blockswap_node(server, object_info):
    assert "wan22BlockSwap" in object_info, f"wan22BlockSwap not listed{server.tail()}"
    info = object_info["wan22BlockSwap"]
    assert info["display_name"] == "WAN 2.2 BlockSwap"
    assert info["category"] == "ComfyUI_Wan22Blockswap"
    assert info["python_module"] == f"custom_nodes.{PACK_DIR}"
    assert info["output"] == ["MODEL"] and info["output_name"] == ["model"]
    assert set(info["input"]) <= {"required", "optional", "hidden"}
    for section, expected in EXPECTED_INPUTS.items():
        listed = info["input"].get(section, {})
        assert list(listed) == list(expected), f"{section} inputs"
        assert info["input_order"][section] == list(expected)
        for name, (type_, default) in expected.items():
            spec = listed[name]
            assert spec[0] == type_, name
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("default") == default, name
            assert options.get("tooltip"), f"{name} has no tooltip"
    assert "hidden" not in info["input"] or not info["input"]["hidden"]
    # The test-only node is there too (the prompt test needs it), from its own package.
    assert object_info["Wan22TestRandomConditioning"]["python_module"] == f"custom_nodes.{TEST_NODES_DIR}"
    assert "IMPORT FAILED" not in server.log(), server.tail()


def test_server_wanblockswap_id_is_never_ours(server, object_info):
    """ComfyUI 0.8+ ships a built-in no-op `wanBlockSwap` (comfy_extras/nodes_nop.py); our id differs."""
    ours = [k for k, v in object_info.items() if v.get("python_module") == f"custom_nodes.{PACK_DIR}"]
    assert "wanBlockSwap" not in ours
    assert "wan22BlockSwap" in ours
    assert not object_info["wan22BlockSwap"].get("deprecated")
    nop = CHECKOUT / "comfy_extras" / "nodes_nop.py"
    if nop.is_file() and 'node_id="wanBlockSwap"' in nop.read_text():
        info = object_info["wanBlockSwap"]
        assert info["python_module"] == "comfy_extras.nodes_nop"
        assert info["display_name"] != "WAN 2.2 BlockSwap"
        assert list(info["input"]["required"]) == ["model"]
    else:
        assert "wanBlockSwap" not in object_info


def test_server_lists_old_id_as_deprecated_alias(server, object_info):
    """`WAN22BlockSwap` (the id earlier versions registered) is listed as deprecated, with the same inputs."""
    old, new = object_info["WAN22BlockSwap"], object_info["wan22BlockSwap"]
    assert old["deprecated"] is True
    assert "deprecated" in old["display_name"].lower()
    assert old["python_module"] == new["python_module"] == f"custom_nodes.{PACK_DIR}"
    for key in ("input", "input_order", "output", "output_name", "category"):
        assert old[key] == new[key], key


# --- (b) a prompt through the server --------------------------------------------------------------


def blockswap_prompt() -> dict:
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_wan_t2v.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "wan22BlockSwap",
            "inputs": {
                "model": ["1", 0],
                "blocks_to_swap": 2,
                "offload_txt_emb": False,
                "offload_img_emb": False,
                "prefetch_blocks": 1,
                "block_swap_debug": True,
            },
        },
        **sample_and_save(["2", 0], "wan22_server/t2v"),
    }


@pytest.fixture(scope="module")
def executed(server):
    """Queues the prompt once; returns (its history entry, the log written while it ran)."""
    log_before = len(server.log())
    status, body = server.request("/prompt", {"prompt": blockswap_prompt(), "client_id": uuid.uuid4().hex})
    assert status == 200, f"/prompt refused the prompt: HTTP {status}: {body}{server.tail()}"
    assert not body.get("node_errors"), body
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    while True:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            break
        if server.proc.poll() is not None:
            pytest.fail(f"ComfyUI server died while running the prompt{server.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"prompt {prompt_id} not done after {PROMPT_TIMEOUT_S} s{server.tail()}")
        time.sleep(0.25)
    # History is written just before the worker logs the run's end: wait for that line too.
    while "Prompt executed in" not in server.log()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.1)
    return history[prompt_id], server.log()[log_before:]


def test_server_runs_blockswap_prompt(server, executed):
    entry, run_log = executed
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], (
        f"prompt failed: {json.dumps(status.get('messages'), indent=1)[-4000:]}{server.tail()}"
    )
    # The node really swapped (on this CPU host dynamic VRAM is off, so BlockSwap takes the model).
    assert "[BlockSwap] 2 of 4 blocks swapped" in run_log, server.tail()
    saved = entry["outputs"]["7"]["latents"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    path = server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    assert path.is_file(), f"{path} not written"
    latent = load_file(str(path))["latent_tensor"]
    assert latent.shape == (1, 16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latent).all() and latent.abs().sum() > 0
    # The server's swapped run equals an unswapped run of the same sampling in this process (both on
    # the CPU; a GPU child, WAN22_COMFYUI_GPU=1, would compare different devices' arithmetic).
    if comfy.model_management.get_torch_device().type != "cpu":
        return
    reference = sample(
        load(server.base / "models" / "diffusion_models" / "tiny_wan_t2v.safetensors"),
        steps=STEPS,
        cfg=CFG,
        seed=SEED,
        frames=latent.shape[2],
        size=SIZE // 8,
    )
    torch.testing.assert_close(latent, reference.to(latent.dtype), rtol=1e-4, atol=1e-5)


# --- (c) the server log -----------------------------------------------------------------------------


def test_server_log_is_clean(server, executed):
    log = server.log()
    assert "Tried to unpin tensor" not in log, server.tail(12000)
    assert "Traceback" not in log, server.tail(12000)
    assert server.proc.poll() is None, f"server exited{server.tail()}"


# --- example workflows (UI format) against the live node definitions ------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes of the UI, never sent to the server
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_WIDGETS = {
    "unet_name",
    "clip_name",
    "vae_name",
    "image",
    "lora_name",
    "safetensors_model",
    "gguf_model",
}  # this server has other files than users


_spec = GEN._spec  # (type, options) of an input in /object_info: a lookup, not the layout logic under test


def widget_slots(info: dict, kind: str | None = None) -> list[tuple[str, str]]:
    """The node's widgets_values layout in the UI (as ComfyUI 0.33's frontend saves it, see host_browser.py):
    (input name, slot) with slot "value", "control" (control_after_generate, also after any INT named seed
    or noise_seed), "upload" (after an image_upload combo) or "extra" (widgets a pack's own script adds)."""
    slots = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
            type_, options = _spec(info, name)
            if options.get("forceInput") or not (isinstance(type_, list) or type_ in WIDGET_TYPES):
                continue
            slots.append((name, "value"))
            if options.get("control_after_generate") or (type_ == "INT" and name in ("seed", "noise_seed")):
                slots.append((name, "control"))
            if options.get("image_upload"):
                slots.append((name, "upload"))
    slots += [(f"extra {i}", "extra") for i in range(len(GEN.FRONTEND_EXTRA_VALUES.get(kind, [])))]
    return slots


def _value_problem(name: str, type_: object, options: dict, value: object) -> str | None:
    if isinstance(type_, list) or type_ == "COMBO":
        choices = type_ if isinstance(type_, list) else options.get("options", [])
        if name in MODEL_FILE_WIDGETS:
            ok = value in choices or (
                isinstance(value, str)
                and value.endswith((".safetensors", ".gguf", ".pt", ".pth", ".png", ".jpg"))
            )
        else:
            ok = value in choices
        return None if ok else f"{value!r} is not one of {choices[:12]}"
    if type_ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if type_ == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if type_ in ("INT", "FLOAT"):
        kinds = (int,) if type_ == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{value!r} is not {type_}"
        low, high = options.get("min", -math.inf), options.get("max", math.inf)
        return None if low <= value <= high else f"{value} is outside [{low}, {high}]"
    return None


def workflow_problems(workflow: dict, object_info: dict) -> list[str]:
    """Everything in a UI-format workflow that this server would not load as written."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        problems.append("duplicate node ids")
    links = {link[0]: link for link in workflow["links"]}
    if len(links) != len(workflow["links"]):
        problems.append("duplicate link ids")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id is below a node id")
    if workflow.get("last_link_id", 0) < max(links, default=0):
        problems.append("last_link_id is below a link id")

    for link_id, origin, origin_slot, target, target_slot, type_ in links.values():
        where = f"link {link_id}"
        if origin not in nodes or target not in nodes:
            problems.append(f"{where}: unknown node")
            continue
        outputs, inputs = nodes[origin].get("outputs", []), nodes[target].get("inputs", [])
        if origin_slot >= len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"{where}: not listed by output {origin_slot} of node {origin}")
        elif outputs[origin_slot]["type"] != type_:
            problems.append(
                f"{where}: type {type_} but output {origin_slot} of node {origin} is {outputs[origin_slot]['type']}"
            )
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"{where}: not the link of input {target_slot} of node {target}")
        elif inputs[target_slot]["type"] != type_:
            problems.append(
                f"{where}: type {type_} but input {target_slot} of node {target} is {inputs[target_slot]['type']}"
            )

    for node in workflow["nodes"]:
        kind, where = node["type"], f"node {node['id']} ({node['type']})"
        if kind in FRONTEND_ONLY:
            continue
        if kind not in object_info:
            problems.append(f"{where}: no such node on this server")
            continue
        info = object_info[kind]
        for slot in node.get("outputs", []):
            listed = slot.get("slot_index", node["outputs"].index(slot))
            if listed >= len(info["output"]) or info["output"][listed] != slot["type"]:
                problems.append(
                    f"{where}: output {slot['name']} ({slot['type']}) does not match {info['output']}"
                )
            for link_id in slot.get("links") or []:
                if link_id not in links or links[link_id][1] != node["id"]:
                    problems.append(f"{where}: output {slot['name']} lists unknown link {link_id}")
        slots = widget_slots(info, kind)
        names = [name for name, slot in slots if slot == "value"]
        for slot in node.get("inputs", []):
            name = slot["name"]
            try:
                type_, _ = _spec(info, name)
            except KeyError:
                problems.append(f"{where}: no input named {name!r}")
                continue
            if "widget" in slot:
                if slot["widget"].get("name") != name or name not in names:
                    problems.append(f"{where}: input {name!r} is not a widget")
            elif name in names:
                problems.append(f"{where}: widget input {name!r} written as a socket")
            elif slot["type"] != type_:
                problems.append(f"{where}: input {name!r} is {slot['type']}, the node says {type_}")
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"{where}: input {name!r} has unknown link {slot['link']}")
        have = {slot["name"] for slot in node.get("inputs", [])}
        missing = [n for n in info["input"].get("required", {}) if n not in have and n not in names]
        if missing:
            problems.append(f"{where}: required inputs {missing} have no socket")
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widgets_values, the node has {len(slots)} ({slots})")
            continue
        extras = iter(GEN.FRONTEND_EXTRA_VALUES.get(kind, []))
        for (name, slot), value in zip(slots, values, strict=True):
            if slot == "control":
                problem = (
                    None if value in CONTROL_VALUES else f"{value!r} is not one of {sorted(CONTROL_VALUES)}"
                )
            elif slot == "upload":
                problem = None if value == "image" else f"{value!r} is not the upload widget's 'image'"
            elif slot == "extra":
                expected = next(extras)
                problem = None if value == expected else f"{value!r} is not {expected!r}"
            else:
                problem = _value_problem(name, *_spec(info, name), value)
            if problem:
                problems.append(f"{where}: widget {name}{'' if slot == 'value' else ' ' + slot}: {problem}")
    return problems


def widget_values(node: dict, object_info: dict) -> dict[str, object]:
    slots = widget_slots(object_info[node["type"]], node["type"])
    return {name: v for (name, slot), v in zip(slots, node["widgets_values"], strict=True) if slot == "value"}


def _nodes_of(workflow: dict, kind: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] == kind]


def test_server_example_workflows_exist():
    assert [p.name for p in WORKFLOWS] == sorted(GEN.EXAMPLES)


def test_server_example_workflows_are_the_generated_ones(object_info):
    """The committed files equal what scripts/make_example_workflows.py builds from this server's node
    definitions: every widget value sits in the slot of the input it names, whatever the input order."""
    if CHECKOUT.resolve() != GEN.DEFAULT_CHECKOUT.resolve():
        pytest.skip(
            f"the examples are generated against {GEN.DEFAULT_CHECKOUT.name}; this is {CHECKOUT.name}"
        )
    built = GEN.build_workflows(object_info)
    assert sorted(built) == [p.name for p in WORKFLOWS]
    for path in WORKFLOWS:
        assert path.read_text() == GEN.dumps(built[path.name]), f"{path.name}: re-run the script"


def test_server_example_widget_values_land_in_their_inputs(object_info):
    """Per node, the values read back by input name are the ones the generator was given by name."""
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            if node["type"] in FRONTEND_ONLY or node["type"] not in object_info:
                continue
            by_name = widget_values(node, object_info)
            spec_names = [n for n, slot in widget_slots(object_info[node["type"]]) if slot == "value"]
            assert list(by_name) == spec_names, (path.name, node["type"])
    t2v = json.loads((ROOT / "example_workflows" / "wan22_blockswap_i2v.json").read_text())
    (unet,) = _nodes_of(t2v, "UNETLoader")
    assert widget_values(unet, object_info)["weight_dtype"] == "fp8_e4m3fn"
    (image,) = _nodes_of(t2v, "LoadImage")
    assert widget_values(image, object_info) == {"image": "start_frame.png"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_server_example_workflow_loads(path, object_info):
    workflow = json.loads(path.read_text())
    if (
        any(n["type"].startswith("WanVideoLooper") for n in workflow["nodes"])
        and "WanVideoLooper" not in object_info
    ):
        pytest.skip(f"needs the WanVideoLooper pack (not found at {LOOPER}; set WANVIDEOLOOPER_PATH)")
    assert workflow_problems(workflow, object_info) == []


def _links_of(workflow):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(node: dict, input_name: str) -> tuple[dict, int]:
        (slot,) = [s for s in node["inputs"] if s["name"] == input_name]
        origin = links[slot["link"]]
        return nodes[origin[1]], origin[2]

    return source


def test_server_t2v_example_shows_loader_blockswap_sampler(object_info):
    workflow = json.loads((ROOT / "example_workflows" / "wan22_blockswap_t2v.json").read_text())
    (swap,) = _nodes_of(workflow, "wan22BlockSwap")
    settings = widget_values(swap, object_info)
    assert settings["blocks_to_swap"] == 25
    assert settings["use_non_blocking"] is True
    assert settings["prefetch_blocks"] == 1
    source = _links_of(workflow)
    (sampler,) = _nodes_of(workflow, "KSampler")
    shift = source(sampler, "model")[0]
    assert shift["type"] == "ModelSamplingSD3" and source(shift, "model")[0] is swap
    assert source(swap, "model")[0]["type"] == "UNETLoader"
    latent = source(sampler, "latent_image")[0]
    assert latent["type"] == "EmptyHunyuanLatentVideo"
    assert widget_values(latent, object_info) == {"width": 832, "height": 480, "length": 33, "batch_size": 1}


def test_server_looper_example_feeds_both_experts_through_looper_models(object_info):
    if "WanVideoLooper" not in object_info:
        pytest.skip(f"needs the WanVideoLooper pack (not found at {LOOPER}; set WANVIDEOLOOPER_PATH)")
    workflow = json.loads((ROOT / "example_workflows" / "wan22_looper_high_low.json").read_text())
    (pair,) = _nodes_of(workflow, "wan22BlockSwapLooperModels")
    (looper,) = _nodes_of(workflow, "WanVideoLooper")
    source = _links_of(workflow)
    assert source(looper, "model_high") == (pair, 0) and source(looper, "model_low") == (pair, 1)
    for role in ("model_high", "model_low"):
        loader, _ = source(pair, role)
        assert loader["type"] == "UNETLoader" and role.split("_")[1] in loader["widgets_values"][0]
    settings = widget_values(pair, object_info)
    assert settings["use_non_blocking"] is True and settings["prefetch_blocks"] == 1


def _swap_node(wf, info):
    return _nodes_of(wf, "wan22BlockSwap")[0]


def _sampler_node(wf, info):
    return _nodes_of(wf, "KSampler")[0]


def _server_renames_node(wf, info):
    info["wan22BlockSwapV2"] = info.pop("wan22BlockSwap")


def _server_renames_input(wf, info):
    optional = info["wan22BlockSwap"]["input"]["optional"]
    info["wan22BlockSwap"]["input"]["optional"] = {
        ("prefetch" if k == "prefetch_blocks" else k): v for k, v in optional.items()
    }
    order = info["wan22BlockSwap"]["input_order"]["optional"]
    order[order.index("prefetch_blocks")] = "prefetch"


def _server_adds_widget(wf, info):
    info["wan22BlockSwap"]["input"]["optional"]["new_setting"] = ["BOOLEAN", {"default": False}]
    info["wan22BlockSwap"]["input_order"]["optional"].append("new_setting")


def _server_renames_socket(wf, info):
    required = info["KSampler"]["input"]["required"]
    info["KSampler"]["input"]["required"] = {("unet" if k == "model" else k): v for k, v in required.items()}
    order = info["KSampler"]["input_order"]["required"]
    order[order.index("model")] = "unet"


def _drop_control_after_generate(wf, info):
    _sampler_node(wf, info)["widgets_values"].pop(1)


def _out_of_range(wf, info):
    _swap_node(wf, info)["widgets_values"][0] = 1000


def _bad_combo(wf, info):
    _sampler_node(wf, info)["widgets_values"][4] = "no_such_sampler"


def _wrong_value_type(wf, info):
    _swap_node(wf, info)["widgets_values"][3] = 1  # use_non_blocking


def _dangling_link(wf, info):
    wf["links"][0][4] += 1


BREAKAGES = [
    (_server_renames_node, "(wan22BlockSwap): no such node"),
    (_server_renames_input, "no input named 'prefetch_blocks'"),
    (_server_adds_widget, "(wan22BlockSwap): 10 widgets_values, the node has 11"),
    (_server_renames_socket, "(KSampler): no input named 'model'"),
    (_drop_control_after_generate, "(KSampler): 6 widgets_values, the node has 7"),
    (_out_of_range, "blocks_to_swap: 1000 is outside [0, 64]"),
    (_bad_combo, "sampler_name: 'no_such_sampler' is not one of"),
    (_wrong_value_type, "use_non_blocking: 1 is not a boolean"),
    (_dangling_link, "link 1: not the link of input 1 of node 2"),
]


@pytest.mark.parametrize("break_it, expected", BREAKAGES, ids=[f.__name__.strip("_") for f, _ in BREAKAGES])
def test_server_example_workflow_check_catches(break_it, expected, object_info):
    """The workflow check fails when a node, an input or a value no longer matches the server."""
    workflow = json.loads((ROOT / "example_workflows" / "wan22_blockswap_t2v.json").read_text())
    assert workflow_problems(workflow, object_info) == []
    broken, info = copy.deepcopy(workflow), copy.deepcopy(object_info)
    break_it(broken, info)
    problems = workflow_problems(broken, info)
    assert any(expected in p for p in problems), problems


def test_server_a14b_example_runs_each_expert_through_lora_shift_and_blockswap(object_info):
    workflow = json.loads((ROOT / "example_workflows" / "wan22_a14b_t2v_gguf_lightx2v.json").read_text())
    source = _links_of(workflow)
    samplers = sorted(_nodes_of(workflow, "KSamplerAdvanced"), key=lambda n: n["pos"][1])
    ranges = []
    for sampler, role in zip(samplers, ("High", "Low"), strict=True):
        values = widget_values(sampler, object_info)
        ranges.append((values["start_at_step"], values["end_at_step"], values["steps"], values["cfg"]))
        swap = source(sampler, "model")[0]
        assert swap["type"] == "wan22BlockSwap"
        shift = source(swap, "model")[0]
        assert shift["type"] == "ModelSamplingSD3" and widget_values(shift, object_info)["shift"] == 5.0
        lora = source(shift, "model")[0]
        assert lora["type"] == "LoraLoaderModelOnly"
        assert "lightx2v_4steps" in widget_values(lora, object_info)["lora_name"]
        loader = source(lora, "model")[0]
        settings = widget_values(loader, object_info)
        assert loader["type"] == "WANModelLoader" and settings["model_type"] == "gguf"
        assert settings["gguf_model"] == f"Wan2.2-T2V-A14B-{role}Noise-Q5_K_M.gguf"
    assert ranges == [(0, 4, 8, 1.0), (4, 8, 8, 1.0)]
    assert source(samplers[1], "latent_image")[0] is samplers[0]


def test_server_sequencer_example_swaps_the_sequence_into_the_looper(object_info):
    if "WanVideoLooper" not in object_info:
        pytest.skip(f"needs the WanVideoLooper pack (not found at {LOOPER}; set WANVIDEOLOOPER_PATH)")
    workflow = json.loads((ROOT / "example_workflows" / "wan22_looper_sequencer.json").read_text())
    source = _links_of(workflow)
    (looper,) = _nodes_of(workflow, "WanVideoLooper")
    swap_seq = source(looper, "model_clip_sequence")[0]
    assert swap_seq["type"] == "wan22BlockSwapSequencer"
    assert source(swap_seq, "model_clip_sequence")[0]["type"] == "WanVideoLoraSequencer"
    assert source(looper, "model_high")[0]["type"] == "wan22BlockSwapLooperModels"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_server_example_note_names_its_file_and_model_files(path, object_info):
    workflow = json.loads(path.read_text())
    (note,) = _nodes_of(workflow, "Note")
    text = note["widgets_values"][0]
    assert path.name in text and "12 GB" in text
    for node in workflow["nodes"]:
        if node["type"] not in object_info:
            continue
        for name, value in widget_values(node, object_info).items():
            if (
                name in MODEL_FILE_WIDGETS | {"gguf_model", "safetensors_model", "lora_name"}
                and value != "none"
            ):
                if node["type"] == "WANModelLoader" and not name.startswith(
                    widget_values(node, object_info)["model_type"]
                ):
                    continue
                assert value in text, f"{path.name}: {value} not named in the Note"

"""The example workflows in ComfyUI's real frontend: headless Chromium, a real server, the UI's own loading.

Runs against one checkout only: the one whose pinned comfyui-frontend-package is the installed one
(ComfyUI 0.33 pins 1.49.6, what the test venv has); other checkouts skip. Needs Playwright for Python
and a Chromium binary (Debian's `chromium`, used as Playwright's executable_path, so no browser
download); without them the module skips and says which is missing.

For every example_workflows/*.json: loaded with the frontend's `app.loadGraphData`, then checked
- no missing-node report (the frontend's own `showMissingNodesError`, and no error overlay),
- every node of this pack built from its definition, with a widget for each widget input,
- the values the UI holds, by input name, equal the file's (and the UI would save the file's values),
and a screenshot written to the test's tmp folder (one copied to docs/ with WAN22_UPDATE_SCREENSHOT=1).
A copy of the t2v example with tiny stand-in model files of the same names (the text encoder replaced by
the test-only conditioning node) is queued from the UI and must complete. Negative control: a workflow
with an unknown node type fails the same check.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from .comfy_helpers import write_checkpoint
from .comfy_server import PACK_DIR, ServerError, installed_frontend, running_server, wait_for_history

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = Path(os.environ["WAN22_COMFYUI"]).resolve()
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
CHROMIUM = os.environ.get("WAN22_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "example_t2v.png"
PAGE_TIMEOUT_MS = 60_000
PROMPT_TIMEOUT_S = 120


def _frontend_pin(checkout: Path) -> str | None:
    req = checkout / "requirements.txt"
    m = re.search(r"^comfyui-frontend-package==([\w.]+)", req.read_text(), re.M) if req.is_file() else None
    return m.group(1) if m else None


def _installed_frontend_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comfyui-frontend-package")
    except PackageNotFoundError:
        return None


def _skip_reason() -> str | None:
    pin, have = _frontend_pin(CHECKOUT), _installed_frontend_version()
    if have is None or installed_frontend() is None:
        return "comfyui-frontend-package is not installed: no frontend to serve"
    if pin != have:
        return (
            f"browser test runs on the checkout whose frontend pin is the installed {have} (ComfyUI 0.33); "
            f"{CHECKOUT.name} pins {pin}"
        )
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright): browser test not run"
    if CHROMIUM is None:
        return "no chromium binary (apt-get install chromium, or set WAN22_CHROMIUM): browser test not run"
    return None


_REASON = _skip_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402  (after the skip: may be missing)


def _generator():
    spec = importlib.util.spec_from_file_location(
        "_wan22_examples", ROOT / "scripts" / "make_example_workflows.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GEN = _generator()
T2V = json.loads((ROOT / "example_workflows" / "wan22_blockswap_t2v.json").read_text())


def _node(workflow: dict, kind: str) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == kind]
    return node


def _tiny_vae_state_dict() -> dict:
    """A WAN 2.1 VAE with 8 base channels: ComfyUI reads its width from the weights (comfy/sd.py)."""
    import comfy.ldm.wan.vae
    import torch

    torch.manual_seed(0)
    vae = comfy.ldm.wan.vae.WanVAE(
        dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


def _stand_in_models(base: Path) -> None:
    """Tiny files under the t2v example's model file names."""
    unet = _node(T2V, "UNETLoader")["widgets_values"][0]
    vae = _node(T2V, "VAELoader")["widgets_values"][0]
    tiny = write_checkpoint(base / "models" / "diffusion_models", "t2v")
    tiny.rename(tiny.with_name(unet))
    (base / "models" / "vae").mkdir(parents=True, exist_ok=True)
    save_file(_tiny_vae_state_dict(), str(base / "models" / "vae" / vae))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_browser")
    try:
        with running_server(CHECKOUT, root, frontend=installed_frontend(), prepare=_stand_in_models) as srv:
            print(
                f"\nComfyUI {CHECKOUT.name} with frontend {_installed_frontend_version()} up in "
                f"{srv.start_seconds:.1f} s on {srv.url}"
            )
            yield srv
    except ServerError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


# Wraps the UI's own missing-node report before anything loads, so every call is recorded.
INSTALL_SPY = """
() => {
  window.__wan22Missing = [];
  const original = window.app.showMissingNodesError.bind(window.app);
  window.app.showMissingNodesError = (types, ...rest) => {
    window.__wan22Missing.push(...types.map(t => (typeof t === 'string' ? t : t.type)));
    return original(types, ...rest);
  };
}
"""

# Loads a workflow through the frontend's loading path and reports what the UI made of it.
LOAD_AND_READ = """
async (workflow) => {
  window.__wan22Missing = [];
  await window.app.loadGraphData(workflow, true, true, 'wan22-example');
  // The frontend records missing node types on the workflow (its errors panel lists them from there).
  const pending = window.app.extensionManager?.workflow?.activeWorkflow?.pendingWarnings;
  for (const t of pending?.missingNodeTypes ?? []) window.__wan22Missing.push(typeof t === 'string' ? t : t.type);
  await new Promise(r => setTimeout(r, 300));
  try { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {}
  window.app.graph.setDirtyCanvas(true, true);
  await new Promise(r => setTimeout(r, 300));
  const registered = window.LiteGraph.registered_node_types;
  const nodes = window.app.graph.nodes.map(n => ({
    id: n.id,
    type: n.type,
    registered: n.type in registered,
    size: [n.size[0], n.size[1]],
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, serialize: w.serialize !== false &&
                                           w.options?.serialize !== false})),
    saved: n.serialize().widgets_values ?? [],  // a node without widgets saves none
  }));
  const overlay = Array.from(document.querySelectorAll('[role="dialog"], .p-dialog, .p-toast-message'))
    .map(e => e.innerText).filter(t => t && /missing/i.test(t));
  return {missing: window.__wan22Missing, overlay, nodes};
}
"""


# No first-run templates dialog, text drawn at the zoom that fits a whole example, no minimap over it.
UI_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Minimap.Visible": False,
}


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 2200, "height": 1100})
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            for key, value in UI_SETTINGS.items():
                status, body = server.request(f"/settings/{key}", value)
                assert status == 200, (key, status, body)
            page.goto(server.url)
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph && "
                "'wan22BlockSwap' in window.LiteGraph.registered_node_types"
            )
            page.evaluate(INSTALL_SPY)
            page.page_errors = errors
            yield page
        finally:
            browser.close()


def load_in_ui(page, workflow: dict) -> dict:
    return page.evaluate(LOAD_AND_READ, workflow)


def ui_problems(workflow: dict, shown: dict, object_info: dict) -> list[str]:
    """What the UI did not take from the file as written (empty: it loaded as the file says)."""
    problems = [f"missing node type reported by the frontend: {t}" for t in shown["missing"]]
    problems += [f"missing-node message shown: {text[:200]!r}" for text in shown["overlay"]]
    by_id = {str(n["id"]): n for n in shown["nodes"]}  # the frontend keeps ids as strings
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        ui = by_id.get(str(node["id"]))
        if ui is None:
            problems.append(f"{where}: not in the UI's graph")
            continue
        if ui["type"] != node["type"] or not ui["registered"]:
            problems.append(f"{where}: the UI has no such node type")
            continue
        if node["type"] in GEN.FRONTEND_ONLY:
            if ui["saved"] != node["widgets_values"]:
                problems.append(f"{where}: note text differs")
            continue
        if ui["saved"] != node["widgets_values"]:
            problems.append(
                f"{where}: the UI would save {json.dumps([str(v)[:40] for v in ui['saved']])}, the file has "
                f"{json.dumps([str(v)[:40] for v in node['widgets_values']])}"
            )
        if node["type"] not in object_info:
            continue
        info = object_info[node["type"]]
        file_values = {
            name: v
            for (name, kind), v in zip(GEN.widget_layout(info), node["widgets_values"], strict=False)
            if kind == "value"
        }
        widgets = {w["name"]: w["value"] for w in ui["widgets"]}
        ours = info.get("python_module") == f"custom_nodes.{PACK_DIR}"
        for name, value in file_values.items():
            if name not in widgets:
                problems.append(f"{where}: no widget {name!r} in the UI")
            elif widgets[name] != value:
                problems.append(f"{where}: widget {name!r} holds {widgets[name]!r}, the file has {value!r}")
        if ours and (ui["size"][0] <= 0 or ui["size"][1] <= 0):
            problems.append(f"{where}: not drawn (size {ui['size']})")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_browser_loads_example_as_written(path, page, object_info, tmp_path_factory):
    workflow = json.loads(path.read_text())
    shown = load_in_ui(page, workflow)
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / f"{path.stem}.png"))
    print(f"\nscreenshot: {shots / f'{path.stem}.png'}")
    if path.stem == "wan22_blockswap_t2v" and os.environ.get("WAN22_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shots / f"{path.stem}.png", SCREENSHOT)
    problems = ui_problems(workflow, shown, object_info)
    assert not problems, "\n".join(problems)
    # Every node of this pack is there with a widget per widget input of its definition.
    ours = [
        n
        for n in workflow["nodes"]
        if object_info.get(n["type"], {}).get("python_module") == f"custom_nodes.{PACK_DIR}"
    ]
    assert ours, "no node of this pack in the example"
    for node in ours:
        (ui,) = [n for n in shown["nodes"] if str(n["id"]) == str(node["id"])]
        expected = [name for name, kind in GEN.widget_layout(object_info[node["type"]]) if kind == "value"]
        assert [w["name"] for w in ui["widgets"] if w["name"] in expected] == expected


def test_browser_check_fails_on_unknown_node_type(page, object_info):
    """Negative control: the same check reports a node type the server does not have."""
    broken = copy.deepcopy(T2V)
    swap = _node(broken, "wan22BlockSwap")
    swap["type"] = "Wan22NoSuchNodeType"
    swap["properties"]["Node name for S&R"] = "Wan22NoSuchNodeType"
    shown = load_in_ui(page, broken)
    problems = ui_problems(broken, shown, object_info)
    assert "Wan22NoSuchNodeType" in shown["missing"], shown["missing"]
    assert any("Wan22NoSuchNodeType" in p for p in problems), problems


def test_browser_check_fails_on_shifted_widget_values(page, object_info):
    """Negative control: values that land in the wrong inputs (one dropped) are caught by name."""
    broken = copy.deepcopy(T2V)
    _node(broken, "wan22BlockSwap")["widgets_values"].pop(0)
    problems = ui_problems(broken, load_in_ui(page, broken), object_info)
    assert any(p.startswith("node 2 (wan22BlockSwap): the UI would save") for p in problems), problems


def _runnable_t2v_copy(object_info: dict) -> dict:
    """The t2v example with the text encoder replaced by the test-only conditioning node, at a tiny size."""
    workflow = copy.deepcopy(T2V)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    clip_loader = _node(workflow, "CLIPLoader")
    dropped = {link[0] for link in workflow["links"] if link[1] == clip_loader["id"]}
    workflow["links"] = [link for link in workflow["links"] if link[0] not in dropped]
    workflow["nodes"].remove(clip_loader)
    layout = GEN.widget_layout(object_info["Wan22TestRandomConditioning"])
    for seed, node in enumerate(n for n in nodes.values() if n["type"] == "CLIPTextEncode"):
        node["type"] = "Wan22TestRandomConditioning"
        node["properties"] = {"Node name for S&R": node["type"]}
        node["inputs"] = [
            {"name": name, "type": "INT", "widget": {"name": name}, "link": None}
            for name, kind in layout
            if kind == "value"
        ]
        values = {"seed": seed + 1, "tokens": 8}
        node["widgets_values"] = [values[name] if kind == "value" else "fixed" for name, kind in layout]

    def set_widget(kind: str, **values):
        node = _node(workflow, kind)
        for i, (name, slot) in enumerate(GEN.widget_layout(object_info[kind])):
            if slot == "value" and name in values:
                node["widgets_values"][i] = values[name]

    set_widget("EmptyHunyuanLatentVideo", width=64, height=64, length=5)
    set_widget("KSampler", steps=2)
    set_widget("SaveAnimatedWEBP", filename_prefix="wan22_browser/t2v")
    return workflow


def test_browser_queues_t2v_example_and_it_completes(page, server, object_info):
    workflow = _runnable_t2v_copy(object_info)
    shown = load_in_ui(page, workflow)
    problems = ui_problems(workflow, shown, object_info)
    assert not problems, "\n".join(problems)
    log_before = len(server.log())
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 30
    while not (set(server.get("/history")) - before) and not server.get("/queue")["queue_running"]:
        assert time.monotonic() < deadline, f"the UI queued nothing{server.tail()}"
        time.sleep(0.25)
    while not (new := set(server.get("/history")) - before):
        assert time.monotonic() < deadline + PROMPT_TIMEOUT_S, f"prompt not done{server.tail()}"
        time.sleep(0.25)
    (prompt_id,) = new
    entry = wait_for_history(server, prompt_id, PROMPT_TIMEOUT_S)
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], (
        f"prompt failed: {json.dumps(status.get('messages'), indent=1)[-4000:]}{server.tail()}"
    )
    # The prompt the UI sent used the pack's node, and it swapped (clamped to the tiny model's 4 blocks).
    sent = entry["prompt"][2]
    swap_id = str(_node(workflow, "wan22BlockSwap")["id"])
    assert sent[swap_id]["class_type"] == "wan22BlockSwap"
    assert sent[swap_id]["inputs"]["blocks_to_swap"] == 25
    assert (
        "[BlockSwap]" in server.log()[log_before:] and "4 of 4 blocks swapped" in server.log()[log_before:]
    ), server.tail()
    save_id = str(_node(workflow, "SaveAnimatedWEBP")["id"])
    (image,) = entry["outputs"][save_id]["images"]
    path = server.base / "output" / image["subfolder"] / image["filename"]
    assert path.is_file() and path.stat().st_size > 0
    assert not page.page_errors, page.page_errors

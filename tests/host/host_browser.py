"""The example workflows in ComfyUI's real frontend: headless Chromium, a real server, the UI's own loading.

Runs against one checkout only: the one whose pinned comfyui-frontend-package is the installed one
(ComfyUI 0.33 pins 1.49.6, what the test venv has); other checkouts skip. Needs Playwright for Python
and a Chromium binary (Debian's `chromium`, used as Playwright's executable_path, so no browser
download); without them the module skips and says which is missing.

For every example_workflows/*.json: loaded with the frontend's `app.loadGraphData`, then checked
- no missing-node report (the frontend's own `showMissingNodesError`, and no error overlay),
- every node of this pack built from its definition, with a widget for each widget input,
- the values the UI holds, by input name, equal the file's (and the UI would save the file's values),
- no two nodes overlap (the frontend's own bounding boxes, title bars included),
and a screenshot written to the test's tmp folder. With WAN22_UPDATE_SCREENSHOT=1 the t2v one is copied to
docs/example_t2v.png (the README's picture) and every example's thumbnail is written beside it as
example_workflows/<name>.jpg, the name ComfyUI's template browser asks for.
Every model file an example names exists in the server's model folders (tiny stand-ins), so the frontend
shows no missing-model message. A copy of the t2v example with runnable stand-ins (a 4-block WAN model, an
8-channel WAN VAE; the text encoder replaced by the test-only conditioning node) is queued from the UI and
must complete. Each node of the pack opens its help page (web/docs/<node id>.md) in the node's Info panel.
Negative controls: an unknown node type, a shifted widget list, two overlapping nodes and a node without
a help page fail the same checks.
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
import urllib.error
import urllib.request
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
HELP_SCREENSHOT = ROOT / "docs" / "help_panel.png"
HELP_DOCS = ROOT / "web" / "docs"
THUMBNAIL_SIZE = 512  # square: the template browser's cards crop to their own shape
UPDATE = os.environ.get("WAN22_UPDATE_SCREENSHOT") == "1"
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


# Where the file names in each loader's widgets live (ComfyUI's model folders; LoadImage reads input/).
MODEL_FOLDERS = {
    "UNETLoader": "models/diffusion_models",
    "WANModelLoader": "models/diffusion_models",
    "WAN22BlockSwapLoader": "models/diffusion_models",
    "CLIPLoader": "models/text_encoders",
    "CLIPVisionLoader": "models/clip_vision",
    "VAELoader": "models/vae",
    "LoraLoaderModelOnly": "models/loras",
    "LoadImage": "input",
}


def _named_files() -> set[tuple[str, str]]:
    """(folder, file name) of every model or image file the examples name."""
    out = set()
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            folder = MODEL_FOLDERS.get(node["type"])
            for value in node.get("widgets_values") or []:
                if folder and isinstance(value, str) and value.endswith((".safetensors", ".gguf", ".png")):
                    out.add((folder, value))
    return out


def _stand_in_models(base: Path) -> None:
    """Tiny files under every file name the examples use: a runnable WAN model and VAE for the t2v example's
    names; for the others a placeholder, which is listed (so the frontend reports nothing missing) but
    never loaded."""
    from PIL import Image

    unet = _node(T2V, "UNETLoader")["widgets_values"][0]
    vae = _node(T2V, "VAELoader")["widgets_values"][0]
    tiny = write_checkpoint(base / "models" / "diffusion_models", "t2v")
    tiny.rename(tiny.with_name(unet))
    (base / "models" / "vae").mkdir(parents=True, exist_ok=True)
    save_file(_tiny_vae_state_dict(), str(base / "models" / "vae" / vae))
    for folder, name in sorted(_named_files()):
        path = base / folder / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):  # a start frame the UI can preview: a dusk gradient
            Image.linear_gradient("L").resize((208, 120)).convert("RGB").save(path)
        else:
            path.write_bytes(b"placeholder: never loaded by the browser test\n")


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
  // One tab: the workflows loaded before are closed (a screenshot shows only this one).
  const store = window.app.extensionManager?.workflow;
  for (const w of [...(store?.openWorkflows ?? [])]) {
    if (w !== store.activeWorkflow) { try { await store.closeWorkflow(w); } catch (e) {} }
  }
  const registered = window.LiteGraph.registered_node_types;
  const nodes = window.app.graph.nodes.map(n => ({
    id: n.id,
    type: n.type,
    registered: n.type in registered,
    size: [n.size[0], n.size[1]],
    bounds: Array.from(n.getBounding()),  // [x, y, width, height], title bar included
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, serialize: w.serialize !== false &&
                                           w.options?.serialize !== false})),
    saved: n.serialize().widgets_values ?? [],  // a node without widgets saves none
  }));
  const overlay = Array.from(document.querySelectorAll('[role="dialog"], .p-dialog, .p-toast-message, [role="alert"]'))
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
    problems += [f"'missing' message shown: {text[:200]!r}" for text in shown["overlay"]]
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


def overlapping_nodes(shown: dict) -> list[str]:
    """Pairs of nodes whose boxes, as the frontend measures them (title bar included), overlap."""
    out = []
    nodes = shown["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounds"], b["bounds"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append(f"node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']})")
    return out


def _missing_messages(page) -> list[str]:
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('[role="dialog"], .p-dialog, .p-toast-message, [role="alert"]'))
             .map(e => e.innerText).filter(t => t && /missing/i.test(t))"""
    )


# The part of the screen the graph covers (every node's box and a margin), for pictures of the graph alone.
GRAPH_CLIP = """
() => {
  const rect = window.app.canvas.canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  let [l, t, r, b] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of window.app.graph.nodes) {
    const [x, y, w, h] = n.getBounding();
    const [x1, y1] = window.app.canvas.ds.convertOffsetToCanvas([x, y]);
    const [x2, y2] = window.app.canvas.ds.convertOffsetToCanvas([x + w, y + h]);
    [l, t, r, b] = [Math.min(l, x1), Math.min(t, y1), Math.max(r, x2), Math.max(b, y2)];
  }
  const m = 24;
  const left = Math.max(rect.left, rect.left + l / dpr - m), top = Math.max(rect.top, rect.top + t / dpr - m);
  const right = Math.min(rect.right, rect.left + r / dpr + m);
  const bottom = Math.min(rect.bottom, rect.top + b / dpr + m);
  return {x: left, y: top, width: right - left, height: bottom - top};
}
"""


def _thumbnail(png: Path, jpg: Path) -> None:
    """The graph's picture fitted into a square on the canvas colour."""
    from PIL import Image

    with Image.open(png) as shot:
        graph = shot.convert("RGB")
        graph.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        square = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), graph.getpixel((2, 2)))
        square.paste(graph, (0, (THUMBNAIL_SIZE - graph.height) // 2))
        square.save(jpg, quality=85, optimize=True)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_browser_loads_example_as_written(path, page, object_info, tmp_path_factory):
    workflow = json.loads(path.read_text())
    shown = load_in_ui(page, workflow)
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    shots.mkdir(exist_ok=True)
    page.wait_for_timeout(700)  # the frontend's missing-model check runs after the load
    shot, graph_shot = shots / f"{path.stem}.png", shots / f"{path.stem}_graph.png"
    page.screenshot(path=str(shot))  # the whole window: tabs, toolbars, any message
    page.screenshot(path=str(graph_shot), clip=page.evaluate(GRAPH_CLIP))
    print(f"\nscreenshots: {shot} {graph_shot}")
    if UPDATE:
        if path.stem == "wan22_blockswap_t2v":
            shutil.copyfile(graph_shot, SCREENSHOT)
        _thumbnail(graph_shot, path.with_suffix(".jpg"))
    problems = ui_problems(workflow, shown, object_info)
    problems += overlapping_nodes(shown)
    problems += [f"'missing' message shown: {text[:200]!r}" for text in _missing_messages(page)]
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


def test_browser_overlap_check_fails_on_overlapped_example(page):
    """Negative control: a node moved onto its neighbour is reported, by the frontend's own bounding boxes."""
    broken = copy.deepcopy(T2V)
    loader, swap = _node(broken, "UNETLoader"), _node(broken, "wan22BlockSwap")
    swap["pos"] = [loader["pos"][0] + 40, loader["pos"][1] + 40]
    found = overlapping_nodes(load_in_ui(page, broken))
    assert f"node {loader['id']} (UNETLoader) overlaps node {swap['id']} (wan22BlockSwap)" in found, found


def test_examples_have_template_thumbnails(server):
    """Each example has <name>.jpg beside it, served where ComfyUI's template browser fetches it
    (/api/workflow_templates/<pack folder>/<name>.jpg), and /workflow_templates lists every example."""
    from PIL import Image

    listed = server.get("/workflow_templates").get(PACK_DIR, [])
    assert sorted(listed) == [p.stem for p in WORKFLOWS]
    for path in WORKFLOWS:
        jpg = path.with_suffix(".jpg")
        assert jpg.is_file(), f"{jpg.name} missing (WAN22_UPDATE_SCREENSHOT=1 writes it)"
        with Image.open(jpg) as image:
            assert image.format == "JPEG" and image.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        status, body, kind = fetch_raw(server, f"/api/workflow_templates/{PACK_DIR}/{jpg.name}")
        assert status == 200 and kind == "image/jpeg" and body == jpg.read_bytes(), (jpg.name, status, kind)


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


# --- help pages: the node's Info panel ---------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_raw(server, path: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET, without decoding."""
    try:
        with _NO_PROXY.open(server.url + path, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


# A fresh graph holding one node of `type`, selected.
ADD_NODE = """
async (type) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const panel = pinia._s.get('rightSidePanel');
  panel.closePanel();  // the Info tab is built again for the next node, not left showing the last one
  for (let i = 0; i < 50 && document.querySelector('.node-help-content'); i++) await sleep(50);
  const graph = window.app.graph;
  graph.clear();
  const node = window.LiteGraph.createNode(type);
  graph.add(node);
  node.pos = [400, 300];
  window.app.canvas.ds.offset = [0, 0];
  window.app.canvas.ds.scale = 1;
  window.app.canvas.selectNode(node);
  graph.setDirtyCanvas(true, true);
  await sleep(300);
}
"""

# Where the only node's title bar is on the screen now (the canvas resizes when the side panel opens).
LOCATE_NODE = """
() => {
  const node = window.app.graph.nodes[0];
  const rect = window.app.canvas.canvas.getBoundingClientRect();
  const [x, y] = window.app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - 15]);
  const dpr = window.devicePixelRatio || 1;
  return [rect.left + x / dpr, rect.top + y / dpr];
}
"""

# The selected node's Info tab in the right side panel: its help page (markdown), or the frontend's fallback
# (description and input table) when the pack has no page for it.
SHOW_HELP = """
async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const panel = pinia._s.get('rightSidePanel');
  const start = Date.now();
  while (Date.now() - start < 1500) {
    if (!panel.isOpen || panel.activeTab !== 'info') panel.openPanel('info');
    const help = document.querySelector('.node-help-content');
    const page = help?.querySelector('.markdown-content');
    const fallback = help?.querySelector('.fallback-content');
    if (page && page.innerText.trim()) return {kind: 'page', text: page.innerText};
    if (fallback) return {kind: 'fallback', text: fallback.innerText};
    await sleep(100);
  }
  return {kind: 'none', text: `panel ${panel.isOpen ? 'open' : 'closed'} on tab ${panel.activeTab}`};
}
"""


def open_help(page, node_type: str) -> dict:
    """Adds a node of `node_type`, selected, and reads its Info panel; where the panel has not seen the
    selection yet, clicks the node's title as a user does (the first click into a fresh canvas may only
    focus it)."""
    page.evaluate(ADD_NODE, node_type)
    for _ in range(4):
        shown = page.evaluate(SHOW_HELP)
        if shown["kind"] != "none":
            break
        page.mouse.click(*page.evaluate(LOCATE_NODE))
    return shown


def help_page_file(node_id: str) -> Path | None:
    """The node's page as the frontend looks for it: docs/<id>/<locale>.md, then docs/<id>.md."""
    for path in (HELP_DOCS / node_id / "en.md", HELP_DOCS / f"{node_id}.md"):
        if path.is_file():
            return path
    return None


def help_problems(page, node_ids) -> list[str]:
    """Nodes whose Info panel does not show their help page from web/docs (empty: every one does)."""
    problems = []
    for node_id in node_ids:
        shown = open_help(page, node_id)
        path = help_page_file(node_id)
        title = path.read_text().splitlines()[0].lstrip("# ").strip() if path else None
        if shown["kind"] != "page":
            problems.append(
                f"{node_id}: no help page in the Info panel ({shown['kind']}: {shown['text'][:80]!r})"
            )
        elif title is None or not shown["text"].startswith(title):
            problems.append(f"{node_id}: the Info panel shows {shown['text'][:60]!r}, not its page {title!r}")
    return problems


def _pack_nodes(object_info: dict) -> list[str]:
    return sorted(k for k, v in object_info.items() if v.get("python_module") == f"custom_nodes.{PACK_DIR}")


def test_browser_help_page_per_node(page, server, object_info, tmp_path_factory):
    ours = _pack_nodes(object_info)
    assert len(ours) == 6, ours
    problems = help_problems(page, ours)
    assert not problems, "\n".join(problems)
    # Served where the frontend fetches it, as Markdown (an HTML answer counts as missing there).
    for node_id in ours:
        path = help_page_file(node_id)
        status, body, kind = fetch_raw(server, f"/extensions/{PACK_DIR}/{path.relative_to(ROOT / 'web')}")
        assert status == 200 and kind != "text/html" and body == path.read_bytes(), (node_id, status, kind)
    # One Help panel as a picture: the main node's.
    open_help(page, "wan22BlockSwap")
    shot = tmp_path_factory.getbasetemp() / "screenshots" / "help_panel.png"
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot))
    print(f"\nscreenshot: {shot}")
    if UPDATE:
        shutil.copyfile(shot, HELP_SCREENSHOT)
    # The deprecated id's page (docs/WAN22BlockSwap/en.md) is the main id's page: on a case-insensitive file
    # system (Windows, macOS) the frontend's request for one may be answered with the other.
    assert (HELP_DOCS / "WAN22BlockSwap" / "en.md").read_bytes() == (
        HELP_DOCS / "wan22BlockSwap.md"
    ).read_bytes()
    # No page left over for a node id the pack does not register.
    pages = {p.stem for p in HELP_DOCS.glob("*.md")} | {p.parent.name for p in HELP_DOCS.glob("*/en.md")}
    assert pages == set(ours), pages ^ set(ours)


def test_browser_help_check_fails_for_a_node_without_page(page, object_info):
    """Negative control: the test-only conditioning node has no help page; the same check says so."""
    assert "Wan22TestRandomConditioning" in object_info
    problems = help_problems(page, ["Wan22TestRandomConditioning"])
    assert problems and problems[0].startswith(
        "Wan22TestRandomConditioning: no help page in the Info panel (fallback"
    ), problems

"""The README and the help pages say what the code does: input defaults, ranges and choices as the nodes
define them, the set-up commands CI runs, links that lead somewhere, and a README short enough to read."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from wan22_blockswap import config, utils
from wan22_blockswap.wan import detect

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
HELP = ROOT / "web" / "docs"
SWAP_NODES = (
    "wan22BlockSwap.md",
    "WAN22BlockSwapLoader.md",
    "wan22BlockSwapLooperModels.md",
    "wan22BlockSwapSequencer.md",
)
RANGES = {
    "blocks_to_swap": (0, config.MAX_BLOCKS),
    "vace_blocks_to_swap": (0, config.MAX_VACE_BLOCKS),
    "prefetch_blocks": (0, config.MAX_PREFETCH),
}


def _table(heading: str) -> dict[str, list[str]]:
    """The rows of the first table after `heading`, by the first cell without backticks."""
    text = README[README.index(heading) :]
    rows = {}
    for line in text.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _text(value) -> str:
    return str(value).lower()


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readme_swap_settings_table_matches_the_node_definitions():
    rows = _table("### Swap settings")
    defaults = config.SwapConfig()
    assert list(rows)[1:] == [f.name for f in dataclasses.fields(config.SwapConfig)]
    for field in dataclasses.fields(config.SwapConfig):
        default, span, _effect = rows[field.name]
        assert default == _text(getattr(defaults, field.name)), field.name
        low_high = RANGES.get(field.name)
        assert span == (f"{low_high[0]}-{low_high[1]}" if low_high else ""), field.name


def test_readme_loader_table_matches_the_node_definitions():
    rows = _table("### Loader settings")
    assert rows["wan_version"][1] == ", ".join(detect.WAN_VERSIONS)
    assert rows["model_variant"][1] == ", ".join(detect.MODEL_VARIANTS)
    assert rows["fp8_optimization"][1].startswith(", ".join(["disabled", *utils.FP8_DTYPES]))
    assert rows["weight_dtype"][1].startswith(", ".join(["auto", *utils.FLOAT_DTYPES]))


@pytest.mark.parametrize("page", SWAP_NODES)
def test_help_pages_state_each_swap_setting_default_and_range(page):
    text = (HELP / page).read_text()
    defaults = config.SwapConfig()
    for field in dataclasses.fields(config.SwapConfig):
        span = RANGES.get(field.name)
        expected = _text(getattr(defaults, field.name)) + (f" ({span[0]}-{span[1]})" if span else "")
        assert f"- **`{field.name}`** — {expected}\n" in text, (page, field.name)


def test_readme_setup_commands_are_the_ones_ci_runs():
    """Exactly two commands: the benchmark on the synthetic model and the tests; .ci/run installs the same
    way and runs the same test command."""
    block = README[README.index("## Set up the benchmark and the tests") :]
    block = block[block.index("```bash") + 7 : block.index("```", block.index("```bash") + 7)]
    commands = [line for line in block.splitlines() if line.strip()]
    setup = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -r requirements-dev.txt && "
    assert commands == [setup + ".venv/bin/python test_performance.py", setup + ".venv/bin/python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and "install -q torch==2.13.0 -r requirements-dev.txt" in ci
    assert ci.rstrip().endswith("$PY -m pytest")


def test_readme_and_docs_links_lead_somewhere():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def _registered_node_ids() -> set[str]:
    """The ids nodes.py registers (read from its source: importing it needs ComfyUI)."""
    source = (ROOT / "nodes.py").read_text()
    literal = source[
        source.index("NODE_CLASS_MAPPINGS = {") : source.index("}", source.index("NODE_CLASS_MAPPINGS = {"))
    ]
    return set(re.findall(r'"(\w+)":', literal)) | set(
        re.findall(r'NODE_CLASS_MAPPINGS\["(\w+)"\] =', source)
    )


def test_every_node_id_has_a_help_page():
    """web/docs/<id>.md or web/docs/<id>/en.md, as the frontend looks them up (the browser test opens them)."""
    ids = _registered_node_ids()
    assert len(ids) == 6, ids
    for node_id in ids:
        assert (HELP / f"{node_id}.md").is_file() or (HELP / node_id / "en.md").is_file(), node_id
    pages = {p.stem for p in HELP.glob("*.md")} | {p.parent.name for p in HELP.glob("*/en.md")}
    assert pages == ids


def test_help_page_paths_differ_on_case_insensitive_file_systems():
    """wan22BlockSwap and WAN22BlockSwap differ only by case: their pages must not share a path on Windows or
    macOS (a file and a folder of different names), and hold the same text (either may be served for both)."""
    names = [p.name.lower() for p in HELP.iterdir()]
    assert len(names) == len(set(names)), names
    assert (HELP / "WAN22BlockSwap" / "en.md").read_text() == (HELP / "wan22BlockSwap.md").read_text()

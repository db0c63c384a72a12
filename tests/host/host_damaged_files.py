"""Damaged WAN files through the WAN Model Loader, seeded and bounded (benchmarks/damaged_files.py does
the work; a longer run is that script's command line).

Every case runs in a worker process (several cases per worker) under a per-case timeout and an
address-space cap, and must end in a clear refusal (a ValueError naming the file) or in a model equal to
the undamaged one, with peak RSS growth under 2x the file's size plus a fixed allowance.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES_PER_FORMAT = 260  # 20 of each kind of damage
SEED = 16


def _fuzz_module():
    spec = importlib.util.spec_from_file_location(
        "wan22_damaged_files", ROOT / "benchmarks" / "damaged_files.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    module = _fuzz_module()
    started = time.perf_counter()
    cases = module.plan_cases(SEED, CASES_PER_FORMAT)
    results = module.run_cases(cases, os.environ["WAN22_COMFYUI"], workers=2, timeout=10.0)
    return module, results, time.perf_counter() - started


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_every_damaged_file_is_refused_by_name_or_loads_as_the_undamaged_model(fuzz, fmt):
    module, results, seconds = fuzz
    rows = [r for r in results if r["format"] == fmt]
    summary = module.summarize(results)[fmt]
    logging.getLogger(__name__).info("[BlockSwap] damaged %s files: %s (%.1f s)", fmt, summary, seconds)
    failures = [
        f"{r['id']} {r['kind']}: {r['outcome']}: {r.get('message', '')}"
        for r in rows
        if r["outcome"] in module.FAILURES
    ]
    assert not failures, "\n".join(failures)
    assert len(rows) == CASES_PER_FORMAT
    assert set(summary["by_kind"]) == set(module.DAMAGE[fmt])  # every kind of damage ran
    # Damage a loader can see is refused: truncations, lying lengths, missing and renamed tensors.
    for kind in ("truncate", "drop"):
        assert summary["by_kind"][kind] == {"refused": CASES_PER_FORMAT // len(module.DAMAGE[fmt])}
    assert all(r["peak_growth"] <= 2 * r["size"] + 64 * 2**20 for r in rows)


def test_the_run_is_bounded(fuzz):
    _module, results, seconds = fuzz
    assert len(results) == 2 * CASES_PER_FORMAT
    assert seconds < 120, f"{len(results)} cases took {seconds:.0f} s"
    assert max(r["seconds"] for r in results) < 10

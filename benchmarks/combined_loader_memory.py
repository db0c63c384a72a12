#!/usr/bin/env python3
"""Host RAM while loading a swapped WAN model: the combined loader against the two-node paths (a benchmark).

1. Writes a 1.3B-shaped WAN 2.1 t2v safetensors file (synthetic_model.PRESETS["1.3b"], random bf16
   weights) into a temporary folder.
2. Loads it in a fresh process per measurement, each time up to a model ComfyUI has loaded and that is
   ready to sample (``load_models_gpu``, which is when the two-node paths build their host copies):
   - ``combined``: WAN BlockSwap Model Loader;
   - ``separate``: WAN Model Loader -> WAN 2.2 BlockSwap;
   - ``unet``: ComfyUI's UNETLoader (Load Diffusion Model) -> WAN 2.2 BlockSwap.
   Memory is the process's anonymous RSS (``RssAnon`` in /proc/self/status, polled every millisecond by a
   thread, plus a last reading): file-backed pages of the memory-mapped file (``RssFile``) are left out,
   since the kernel drops them under pressure. Reported: peak growth over the baseline after all imports,
   against the model's bytes (its tensors as ComfyUI stores them). Target for ``combined``: at most 1.1x.
3. In one more fresh process: five cycles of combined load -> one sampling step -> unload; the RSS
   (VmRSS and RssAnon) after each cycle must stay within 1 % of the first cycle's.

Run with a Python that has torch and ComfyUI's requirements, e.g.:
    .venv/bin/python benchmarks/combined_loader_memory.py --comfyui $HOME/comfy-hosts/0.8.1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_load_memory as common  # noqa: E402  (its /proc readings, file writer and machine report)

sys.path.remove(str(Path(__file__).resolve().parent))

DEFAULT_COMFYUI = common.DEFAULT_COMFYUI
TARGET_RATIO = 1.1
CYCLE_TOLERANCE = 0.01
PATHS = ("combined", "separate", "unet")


def write_file(path: Path, preset: str, layers: int | None = None) -> dict[str, object]:
    import math

    import torch
    from safetensors.torch import save_file

    common.load_package()
    from wan22_blockswap.bench import synthetic_model

    shape = synthetic_model.PRESETS[preset]
    if layers:
        import dataclasses

        shape = dataclasses.replace(shape, num_layers=layers)
    with torch.device("meta"):
        model = synthetic_model.SyntheticWanModel(shape, "t2v")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = common.LazyWeights(shapes)
    start = time.perf_counter()
    save_file({k: weights[k].to(torch.bfloat16) for k in weights}, str(path))
    return {
        "preset": preset,
        "blocks": shape.num_layers,
        "dim": shape.dim,
        "params": sum(math.prod(s) for s in shapes.values()),
        "file_bytes": path.stat().st_size,
        "write_seconds": round(time.perf_counter() - start, 1),
    }


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _setup(args):
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not args.gpu
    import comfy.model_management as mm
    import comfy.sd  # noqa: F401  (imported before the baseline)
    import folder_paths

    import nodes as comfy_nodes  # ComfyUI's nodes.py: UNETLoader

    common.load_package()
    from wan22_blockswap import nodes

    folder_paths.add_model_folder_path("diffusion_models", str(Path(args.file).parent), is_default=True)
    return mm, comfy_nodes, nodes


def _load(path: str, name: str, settings: dict, comfy_nodes, nodes):
    if path == "combined":
        (model,) = nodes.WAN22BlockSwapLoader().load_model(
            "safetensors", name, "none", "auto", "auto", "disabled", "auto", **settings
        )
        return model
    if path == "separate":
        (model,) = nodes.WANModelLoader().load_model("safetensors", name, "none")
    else:
        (model,) = comfy_nodes.UNETLoader().load_unet(name, "default")
    (swapped,) = nodes.WAN22BlockSwap().apply(model, **settings)
    return swapped


def _model_bytes(model) -> int:
    common.load_package()
    from wan22_blockswap.block_manager import tensor_nbytes

    return sum(tensor_nbytes(t) for t in model.model.diffusion_model.state_dict(keep_vars=True).values())


def child_load(args) -> dict[str, object]:
    mm, comfy_nodes, nodes = _setup(args)
    settings = {"blocks_to_swap": args.blocks_to_swap}
    name = Path(args.file).name
    _trim()
    import torch

    cuda = args.gpu and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        vram_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    baseline = common.proc_status()
    start = time.perf_counter()
    with common.PeakPoller(interval=0.001, key="RssAnon") as peak:
        model = _load(args.child, name, settings, comfy_nodes, nodes)
        mm.load_models_gpu([model])  # what sampling does first: the two-node paths build host copies here
    seconds = time.perf_counter() - start
    after = common.proc_status()
    from wan22_blockswap import callbacks

    engine = callbacks.plan_of(model).engine
    block = max((u.nbytes for u in engine.swapped_units), default=0)
    gpu = {}
    if cuda:
        torch.cuda.synchronize()
        gpu = {
            "peak_vram_growth": torch.cuda.max_memory_allocated() - vram_before,
            "resident_on_gpu": model.model.model_loaded_weight_memory,
            "largest_swapped_block": block,
        }
    return {
        **gpu,
        "path": args.child,
        "seconds": round(seconds, 2),
        "model_bytes": _model_bytes(model),
        "swapped_bytes": engine.swapped_bytes(),
        "peak_anon_growth": peak.peak - baseline["RssAnon"],
        "after": {k: after[k] - baseline[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "slab_bytes_from_file": engine.counters.slab_bytes_from_sources,
    }


def child_cycles(args) -> dict[str, object]:
    import torch

    mm, comfy_nodes, nodes = _setup(args)
    import comfy.sample

    name = Path(args.file).name
    readings = []
    for _ in range(args.cycles):
        model = _load("combined", name, {"blocks_to_swap": args.blocks_to_swap}, comfy_nodes, nodes)
        latent = torch.zeros(1, 16, 1, 8, 8)
        g = torch.Generator().manual_seed(0)
        cond = [[torch.randn(1, 8, 4096, generator=g), {}]]
        with torch.no_grad():
            comfy.sample.sample(
                model,
                comfy.sample.prepare_noise(latent, 0),
                1,
                1.0,
                "euler",
                "simple",
                cond,
                cond,
                latent,
                disable_pbar=True,
                seed=0,
            )
        del model
        mm.unload_all_models()
        mm.soft_empty_cache()
        _trim()
        status = common.proc_status()
        readings.append({"VmRSS": status["VmRSS"], "RssAnon": status["RssAnon"]})
    first = readings[0]
    drift = max(abs(r[k] - first[k]) / first[k] for r in readings for k in ("VmRSS", "RssAnon"))
    return {"cycles": readings, "max_drift": drift}


def run_child(args, mode: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", mode, "--file", str(args.file), "--comfyui", args.comfyui]
    cmd += ["--blocks-to-swap", str(args.blocks_to_swap), "--cycles", str(args.cycles)]
    if args.gpu:
        cmd.append("--gpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(result: dict[str, object]) -> None:
    fmt = common.fmt
    m, f = result["machine"], result["file"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; {m['platform']}, torch {m['torch']}")
    print(f"ComfyUI {result['comfyui']} ({'GPU' if result['gpu'] else 'CPU mode'})")
    print(
        f"File: {f['preset']}-shaped WAN 2.1 t2v, {f['blocks']} blocks, dim {f['dim']}, "
        f"{f['params'] / 1e9:.2f}B params, bf16: {fmt(f['file_bytes'])}"
    )
    print(f"blocks_to_swap={result['blocks_to_swap']}; each load in a fresh process, up to load_models_gpu")
    print(
        f"\n  {'path':<10}{'s':>7}{'model':>12}{'peak anon growth':>18}{'x model':>9}{'after: anon / file':>24}"
    )
    for r in result["loads"]:
        a = r["after"]
        print(
            f"  {r['path']:<10}{r['seconds']:>7}{fmt(r['model_bytes']):>12}{fmt(r['peak_anon_growth']):>18}"
            f"{r['peak_anon_growth'] / r['model_bytes']:>9.3f}{fmt(a['RssAnon']) + ' / ' + fmt(a['RssFile']):>24}"
        )
    print(f"  target (combined) peak anon growth <= {TARGET_RATIO}x model: {result['target']}")
    for r in result["loads"]:
        if "peak_vram_growth" in r:
            bound = r["resident_on_gpu"] + r["largest_swapped_block"]
            host = 1.1 * (r["swapped_bytes"] + r["largest_swapped_block"])
            print(
                f"  {r['path']:<10} GPU: peak VRAM during load {fmt(r['peak_vram_growth'])} (resident + one block "
                f"{fmt(bound)}), peak host anon growth {fmt(r['peak_anon_growth'])} (1.1 x (swapped + one block) "
                f"{fmt(host)})"
            )
    c = result["cycles"]
    rss = ", ".join(f"{fmt(r['VmRSS'])}/{fmt(r['RssAnon'])}" for r in c["cycles"])
    print(f"\n{len(c['cycles'])} combined load/sample/unload cycles, RSS/anon after each: {rss}")
    print(
        f"  largest drift from the first: {c['max_drift'] * 100:.2f} % (target {CYCLE_TOLERANCE * 100:.0f} %)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comfyui", default=DEFAULT_COMFYUI, help="ComfyUI checkout (default: %(default)s)")
    parser.add_argument("--preset", default="1.3b", help="synthetic_model preset of the file (default 1.3b)")
    parser.add_argument("--layers", type=int, help="blocks of the file (default: the preset's)")
    parser.add_argument("--blocks-to-swap", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="fresh-process loads per path (default 1)")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--workdir", help="folder for the file (default: a temporary one, deleted)")
    parser.add_argument("--file", help="use this safetensors file instead of writing one")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: CPU mode)")
    parser.add_argument("--child", choices=[*PATHS, "cycles"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "cycles":
        print(json.dumps(child_cycles(args)))
        return 0
    if args.child:
        print(json.dumps(child_load(args)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wan_combined_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.file:
            args.file = Path(args.file)
            info = {"preset": "given", "blocks": "?", "dim": "?", "params": 0, "write_seconds": 0}
            info["file_bytes"] = args.file.stat().st_size
        else:
            args.file = workdir / f"wan_{args.preset}_t2v_bf16.safetensors"
            print(f"writing {args.file} ...", file=sys.stderr)
            info = write_file(args.file, args.preset, args.layers)
        loads = []
        for run in range(args.runs):
            for path in PATHS:
                print(f"loading: {path} (run {run + 1}) ...", file=sys.stderr)
                loads.append(run_child(args, path))
        print(f"{args.cycles} cycles ...", file=sys.stderr)
        cycles = run_child(args, "cycles")
        worst = max(r["peak_anon_growth"] / r["model_bytes"] for r in loads if r["path"] == "combined")
        result = {
            "machine": common.machine(),
            "comfyui": common.comfyui_version(args.comfyui),
            "gpu": args.gpu,
            "file": info,
            "blocks_to_swap": args.blocks_to_swap,
            "loads": loads,
            "target": f"{'met' if worst <= TARGET_RATIO else 'NOT met'} (worst run {worst:.3f}x)",
            "cycles": cycles,
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if worst <= TARGET_RATIO and cycles["max_drift"] <= CYCLE_TOLERANCE else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

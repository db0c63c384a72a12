#!/usr/bin/env python3
"""GGUF loading memory and dequantization speed (a benchmark, not a test).

1. Writes a GGUF of a 1.3B-shaped WAN model (synthetic_model.PRESETS["1.3b"], random weights, Q8_0 by
   default) into a temporary folder, one tensor at a time.
2. Loads it in a fresh process per loader, through the node a user would use: our WAN Model Loader and,
   when a checkout is found, ComfyUI-GGUF's UnetLoaderGGUF. Reports peak RSS growth over the process's
   baseline after all imports (VmHWM after resetting it through /proc/self/clear_refs, plus a polling
   thread), the RSS split into anonymous and file-backed memory after loading, and the same after every
   quantized weight has been decoded once (which pages the file in). Target: growth < 1.2x the file size.
3. Measures CPU dequantization throughput of gguf_dequant against gguf.quants.dequantize (numpy), and
   against ComfyUI-GGUF's torch dequantizers when present.

Run with a Python that has torch, gguf and ComfyUI's requirements, e.g.:
    $HOME/venvs/host/bin/python benchmarks/gguf_load_memory.py --comfyui $HOME/comfy-hosts/0.8.1
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path.home()
DEFAULT_COMFYUI = os.environ.get("WAN22_COMFYUI") or str(HOME / "comfy-hosts" / "0.8.1")
DEFAULT_COMFYUI_GGUF = str(HOME / "comfy-hosts" / "ComfyUI-GGUF")
TARGET_RATIO = 1.2


def load_package():
    """This repository as the package `wan22_blockswap`, imported the way the benchmark CLI does it."""
    sys.path.insert(0, str(ROOT))
    try:
        from test_performance import load_package as load_repository_package
    finally:
        sys.path.remove(str(ROOT))  # the repository's nodes.py must not shadow ComfyUI's `nodes`
    return load_repository_package()


def fmt(n: float) -> str:
    return load_package().utils.format_bytes(n)


# --------------------------------------------------------------------------------------------
# Memory readings (Linux /proc)
# --------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakPoller:
    """Samples one /proc/self/status reading (VmRSS by default) every few milliseconds while active, plus a
    last reading at the end (a fallback when VmHWM cannot be reset; the only way to a peak of RssAnon)."""

    def __init__(self, interval: float = 0.005, key: str = "VmRSS"):
        self.interval = interval
        self.key = key
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()[self.key])
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = proc_status()[self.key]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()[self.key])
        return False


# --------------------------------------------------------------------------------------------
# Writing the test file
# --------------------------------------------------------------------------------------------


class LazyWeights(Mapping):
    """Random weights of a WAN state dict, made one tensor at a time when the writer asks for it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes = shapes
        self.names = list(shapes)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __getitem__(self, name: str):
        import torch

        shape = self.shapes[name]
        g = torch.Generator().manual_seed(self.seed + self.names.index(name))
        values = torch.randn(shape, generator=g)
        if name.endswith("modulation"):
            values /= shape[-1] ** 0.5
        elif len(shape) >= 2:
            values /= math.prod(shape[1:]) ** 0.5
        elif "norm" in name and name.endswith("weight"):
            values = 1 + 0.1 * values
        else:
            values *= 0.02
        return values


def write_test_file(path: Path, preset: str, qtype_name: str) -> dict[str, object]:
    import torch
    from gguf import GGMLQuantizationType

    load_package()
    from wan22_blockswap.bench import synthetic_model
    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    shape = synthetic_model.PRESETS[preset]
    with torch.device("meta"):
        model = synthetic_model.SyntheticWanModel(shape, "t2v")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    qtype = GGMLQuantizationType[qtype_name]
    start = time.perf_counter()
    written = write_wan_gguf(path, LazyWeights(shapes), lambda name, tensor: qtype)
    seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    for t in written.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    return {
        "preset": preset,
        "qtype": qtype_name,
        "params": sum(math.prod(s) for s in shapes.values()),
        "blocks": shape.num_layers,
        "dim": shape.dim,
        "file_bytes": path.stat().st_size,
        "tensor_types": counts,
        "write_seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------
# Child: one load in a fresh process
# --------------------------------------------------------------------------------------------


def _import_comfyui_gguf(path: str):
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-GGUF", Path(path) / "__init__.py", submodule_search_locations=[path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI-GGUF"] = module
    spec.loader.exec_module(module)
    return sys.modules["ComfyUI-GGUF.nodes"], sys.modules["ComfyUI-GGUF.dequant"]


def child_load(args) -> dict[str, object]:
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not args.gpu
    import comfy.model_management  # noqa: F401  (imports done before the baseline)
    import comfy.sd  # noqa: F401
    import folder_paths
    import torch

    load_package()
    from wan22_blockswap import nodes
    from wan22_blockswap.quant.reader import GGUFWeight

    city_nodes = city_dequant = None
    if args.child == "comfyui-gguf":
        city_nodes, city_dequant = _import_comfyui_gguf(args.comfyui_gguf)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(args.file).parent), is_default=True)
    name = Path(args.file).name

    gc.collect()
    baseline = proc_status()
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    with PeakPoller() as poller:
        if args.child == "ours":
            (model,) = nodes.WANModelLoader().load_model("gguf", "none", name)
        else:
            (model,) = city_nodes.UnetLoaderGGUF().load_unet(name)
    seconds = time.perf_counter() - start
    after = proc_status()
    peak = max(poller.peak, after["VmHWM"] if hwm_reset else 0)

    # Decode every quantized weight once (what the first sampling step does, minus the matmuls).
    quantized = 0
    start = time.perf_counter()
    with torch.no_grad():
        for param in model.model.parameters():
            if isinstance(param, GGUFWeight):
                param.dequantize(torch.float16)
                quantized += 1
            elif city_dequant is not None and city_dequant.is_quantized(param):
                city_dequant.dequantize_tensor(param, torch.float16)
                quantized += 1
    decode_seconds = time.perf_counter() - start
    touched = proc_status()
    return {
        "loader": args.child,
        "patcher": type(model).__name__,
        "load_seconds": round(seconds, 2),
        "baseline_rss": baseline["VmRSS"],
        "peak_growth": peak - baseline["VmRSS"],
        "peak_method": "VmHWM reset + polling" if hwm_reset else "polling (5 ms)",
        "after_load": {k: after[k] - baseline[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "quantized_weights": quantized,
        "decode_seconds": round(decode_seconds, 2),
        "after_decoding_all": {k: touched[k] - baseline[k] for k in ("VmRSS", "RssAnon", "RssFile")},
    }


def run_child(args, loader: str, file: Path) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        loader,
        "--file",
        str(file),
        "--comfyui",
        args.comfyui,
        "--comfyui-gguf",
        args.comfyui_gguf,
    ]
    if args.gpu:
        cmd.append("--gpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} load failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Dequantization throughput
# --------------------------------------------------------------------------------------------

K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _raw_blocks(qtype, n_elements: int, seed: int = 0):
    """Raw bytes of n_elements values of qtype: quantized by numpy where it can, else random blocks."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype.name in K_SCALE_OFFSETS:
        blocks = rng.integers(0, 256, size=(n_elements // block, type_size), dtype=np.uint8)
        for offset in K_SCALE_OFFSETS[qtype.name]:  # finite fp16 scales of realistic size
            scale = rng.uniform(-0.02, 0.02, size=blocks.shape[0]).astype(np.float16)
            blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(-1)
    values = (rng.standard_normal(n_elements) * 0.02).astype(np.float32).reshape(-1, 4096)
    return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(-1)


def _median_seconds(repeats: int, fn, *args, **kwargs) -> float:
    fn(*args, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dequant_throughput(args) -> list[dict[str, object]]:
    import gguf
    import torch
    from gguf import GGMLQuantizationType

    load_package()
    from wan22_blockswap.quant.dequant import dequantize

    city = None
    if Path(args.comfyui_gguf, "dequant.py").is_file():
        spec = importlib.util.spec_from_file_location(
            "_comfyui_gguf_dequant", Path(args.comfyui_gguf, "dequant.py")
        )
        city = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(city)

    n = args.dequant_elements
    shape = (n // 4096, 4096)
    rows = []
    for name in args.dequant_types:
        qtype = GGMLQuantizationType[name]
        raw_np = _raw_blocks(qtype, n)
        raw = torch.from_numpy(raw_np)
        ours32 = _median_seconds(args.repeats, dequantize, raw, qtype, shape, torch.float32)
        ours16 = _median_seconds(args.repeats, dequantize, raw, qtype, shape, torch.float16)
        ref = _median_seconds(max(1, args.repeats // 2), gguf.quants.dequantize, raw_np, qtype)
        row = {
            "type": name,
            "elements": n,
            "raw_bytes": raw_np.nbytes,
            "ours_f32_melem_s": round(n / ours32 / 1e6, 1),
            "ours_f16_melem_s": round(n / ours16 / 1e6, 1),
            "numpy_melem_s": round(n / ref / 1e6, 1),
            "speedup_vs_numpy": round(ref / ours32, 2),
        }
        if city is not None and qtype in city.dequantize_functions:
            theirs = _median_seconds(args.repeats, city.dequantize, raw, qtype, shape, dtype=torch.float32)
            row["comfyui_gguf_f32_melem_s"] = round(n / theirs / 1e6, 1)
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram": fmt(ram),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def comfyui_version(path: str) -> str:
    version_file = Path(path, "comfyui_version.py")
    if version_file.is_file():
        text = version_file.read_text()
        if '"' in text:
            return text.split('"')[-2]
    return Path(path).name


def print_report(result: dict[str, object]) -> None:
    m, f = result["machine"], result["file"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['ram']} RAM")
    print(f"         {m['platform']}, Python {m['python']}, torch {m['torch']}, ComfyUI {result['comfyui']}")
    print(
        f"File: {f['preset']}-shaped WAN ({f['blocks']} blocks, dim {f['dim']}, {f['params'] / 1e9:.2f}B params), "
        f"{f['qtype']}: {fmt(f['file_bytes'])} ({f['tensor_types']}), written in {f['write_seconds']} s"
    )
    print("\nLoad (RSS growth over the baseline after imports; each run in a fresh process)")
    header = f"  {'loader':<14}{'load s':>8}{'peak growth':>14}{'x file':>8}{'after load anon/file':>24}"
    print(header + f"{'decoded once anon/file':>28}")
    for run in result["loads"]:
        ratio = run["peak_growth"] / f["file_bytes"]
        a, d = run["after_load"], run["after_decoding_all"]
        print(
            f"  {run['loader']:<14}{run['load_seconds']:>8}{fmt(run['peak_growth']):>14}{ratio:>8.3f}"
            f"{fmt(a['RssAnon']) + ' / ' + fmt(a['RssFile']):>24}"
            f"{fmt(d['RssAnon']) + ' / ' + fmt(d['RssFile']):>28}"
        )
    for loader, verdict in result["target"].items():
        print(f"  target growth < {TARGET_RATIO}x file size, {loader}: {verdict}")
    if result.get("skipped"):
        print(f"  ({result['skipped']})")
    rows = result["dequant"]
    if rows:
        n = rows[0]["elements"]
        print(f"\nCPU dequantization throughput, {n / 1e6:.1f}M elements per tensor, median (Melem/s)")
        print(
            f"  {'type':<6}{'ours f32':>10}{'ours f16':>10}{'gguf numpy':>12}{'ours/numpy':>12}{'ComfyUI-GGUF f32':>18}"
        )
        for r in rows:
            city = r.get("comfyui_gguf_f32_melem_s", "-")
            print(
                f"  {r['type']:<6}{r['ours_f32_melem_s']:>10}{r['ours_f16_melem_s']:>10}{r['numpy_melem_s']:>12}"
                f"{r['speedup_vs_numpy']:>11}x{city:>18}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comfyui", default=DEFAULT_COMFYUI, help="ComfyUI checkout (default: %(default)s)")
    parser.add_argument("--comfyui-gguf", default=DEFAULT_COMFYUI_GGUF, help="ComfyUI-GGUF checkout, if any")
    parser.add_argument("--preset", default="1.3b", help="synthetic_model preset of the file (default 1.3b)")
    parser.add_argument(
        "--qtype", default="Q8_0", help="GGML type of the weights (numpy-writable, default Q8_0)"
    )
    parser.add_argument("--runs", type=int, default=2, help="load runs per loader (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per dequant measurement")
    parser.add_argument("--dequant-elements", type=int, default=4096 * 4096)
    parser.add_argument("--dequant-types", nargs="*", default=["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
    parser.add_argument("--workdir", help="folder for the GGUF file (default: a temporary one, deleted)")
    parser.add_argument("--file", help="use this GGUF file instead of writing one")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: CPU mode)")
    parser.add_argument("--child", choices=["ours", "comfyui-gguf"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child_load(args)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wan_gguf_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.file:
            file = Path(args.file)
            info = {
                "preset": "given",
                "qtype": "?",
                "params": 0,
                "blocks": "?",
                "dim": "?",
                "file_bytes": file.stat().st_size,
                "tensor_types": {},
                "write_seconds": 0,
            }
        else:
            file = workdir / f"wan_{args.preset}_{args.qtype}.gguf"
            print(f"writing {file} ...", file=sys.stderr)
            info = write_test_file(file, args.preset, args.qtype)
        gc.collect()
        loaders = ["ours"]
        skipped = None
        if Path(args.comfyui_gguf, "__init__.py").is_file():
            loaders.append("comfyui-gguf")
        else:
            skipped = f"ComfyUI-GGUF not found at {args.comfyui_gguf}: not measured"
        loads = []
        for run in range(args.runs):
            for loader in loaders:
                print(f"loading with {loader} (run {run + 1}) ...", file=sys.stderr)
                loads.append(run_child(args, loader, file))
        target = {}
        for loader in loaders:
            worst = max(r["peak_growth"] for r in loads if r["loader"] == loader)
            ratio = worst / info["file_bytes"]
            target[loader] = f"{'met' if ratio < TARGET_RATIO else 'NOT met'} (worst run {ratio:.3f}x)"
        print("dequantization throughput ...", file=sys.stderr)
        result = {
            "machine": machine(),
            "comfyui": comfyui_version(args.comfyui),
            "file": info,
            "loads": loads,
            "target": target,
            "skipped": skipped,
            "dequant": dequant_throughput(args),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

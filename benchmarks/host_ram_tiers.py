#!/usr/bin/env python3
"""Host RAM that BlockSwap adds to a GGUF model, per host_memory tier (a benchmark; the host tests run its
children under a memory cgroup, tests/host/host_ram.py).

1. Writes a WAN-shaped GGUF (synthetic_model preset, random weights, Q8_0 by default) into a temporary
   folder, one tensor at a time.
2. In a fresh process per tier (ComfyUI in CPU mode): loads it through ComfyUI-GGUF's UnetLoaderGGUF (or
   our WAN Model Loader), samples one step unswapped, then applies WAN 2.2 BlockSwap with every block
   swapped and the tier's host_memory, samples one step again, then drops the file's page cache
   (madvise + posix_fadvise DONTNEED) and samples once more. Reported: anonymous RSS (RssAnon, after
   malloc_trim) after the unswapped step and after the swapped step, its peak during the swapped step,
   and whether both swapped outputs equal the unswapped one bit for bit.

    .venv/bin/python benchmarks/host_ram_tiers.py --comfyui $HOME/comfy-hosts/0.33 --bf16-unet

--package PATH imports the pack from another checkout of this repository (the same command "before").
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_load_memory as common  # noqa: E402  (its /proc readings, GGUF writer and ComfyUI-GGUF import)

sys.path.remove(str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "wan22_blockswap"
TIERS = ("ram", "auto", "file")
LOADERS = ("comfyui-gguf", "ours")
# A WAN-shaped file small enough for a test: 1.3B's attention layout at dim 1024, four blocks (~18 MiB each
# in Q8_0), so 5 % of the swapped bytes is well above the few MiB the allocator moves between runs.
TEST_SHAPE = {"dim": 1024, "ffn_dim": 4096, "num_heads": 8, "num_layers": 4}


def load_package(root: Path):
    """The repository at `root` as the package `wan22_blockswap` (relative imports inside)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def write_file(path: Path, preset: str, qtype: str, seed_offset: int = 0) -> dict[str, object]:
    """common.write_test_file for a preset name or "test" (TEST_SHAPE); seed_offset makes a second expert."""
    load_package(ROOT)
    from wan22_blockswap.bench import synthetic_model

    if preset == "test":
        synthetic_model.PRESETS["test"] = synthetic_model.WanShape(**TEST_SHAPE)
    if seed_offset:
        original = common.LazyWeights.__init__

        def seeded(self, shapes, seed=0):
            original(self, shapes, seed + seed_offset)

        common.LazyWeights.__init__ = seeded
        try:
            return common.write_test_file(path, preset, qtype)
        finally:
            common.LazyWeights.__init__ = original
    return common.write_test_file(path, preset, qtype)


def anon_rss() -> int:
    """RssAnon after returning freed heap to the OS (what the process really holds)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return common.proc_status()["RssAnon"]


def drop_page_cache(path: str) -> int:
    """Evict the file's pages: unmap them from this process (clean file pages: nothing is lost, the next
    touch reads them again) and tell the kernel to drop them from the page cache. Returns RssFile freed."""
    before = common.proc_status()["RssFile"]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.realpath(parts[5].strip()) == real:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                libc.madvise(start, end - start, 4)  # MADV_DONTNEED
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return before - common.proc_status()["RssFile"]


# --------------------------------------------------------------------------------------------
# Children (fresh processes)
# --------------------------------------------------------------------------------------------


def _setup_comfyui(args):
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.bf16_unet = args.bf16_unet
    import comfy.model_management  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401

    load_package(Path(args.package))


def _load(args, path: str):
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(Path(path).parent), is_default=True)
    name = Path(path).name
    if args.loader == "ours":
        from wan22_blockswap import nodes

        return nodes.WANModelLoader().load_model("gguf", "none", name)[0]
    city_nodes, _ = common._import_comfyui_gguf(args.comfyui_gguf)
    return city_nodes.UnetLoaderGGUF().load_unet(name)[0]


def _sample(model, seed: int = 0):
    import comfy.sample
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    positive = [[torch.randn(1, 8, 4096, generator=g), {}]]
    negative = [[torch.randn(1, 8, 4096, generator=g), {}]]
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, 1, 2.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=seed
    )


def _block_swap(model, tier: str):
    from wan22_blockswap import nodes

    node = nodes.WAN22BlockSwap()
    settings = {"blocks_to_swap": len(model.model.diffusion_model.blocks), "prefetch_blocks": 1}
    if tier != "before":  # a checkout from before the file tier has no host_memory input
        settings["host_memory"] = tier
    return node.apply(model, offload_txt_emb=False, offload_img_emb=False, **settings)[0]


def _tiers_of(model) -> dict[str, int]:
    from wan22_blockswap import callbacks

    engine = callbacks.plan_of(model).engine
    host = getattr(engine, "host", None)
    if host is None or not hasattr(host, "tier_summary"):
        return {
            "slab_bytes": sum(u.nbytes for u in engine.swapped_units),
            "swapped_bytes": engine.swapped_bytes(),
        }
    return {**host.tier_summary(engine.swapped_units), "swapped_bytes": engine.swapped_bytes()}


def child_single(args) -> dict[str, object]:
    import torch

    _setup_comfyui(args)
    baseline = anon_rss()
    model = _load(args, args.file)
    reference = _sample(model)
    unswapped = anon_rss()
    swapped = _block_swap(model, args.host_memory)
    with common.PeakPoller(key="RssAnon") as poller:
        first = _sample(swapped)
    after = anon_rss()
    started = time.perf_counter()
    dropped = drop_page_cache(args.file)
    cold = _sample(swapped)
    cold_seconds = time.perf_counter() - started
    return {
        "loader": args.loader,
        "host_memory": args.host_memory,
        "anon_baseline": baseline,
        "anon_unswapped": unswapped,
        "anon_swapped": after,
        "anon_swapped_peak": poller.peak,
        "added_by_blockswap": after - unswapped,
        "page_cache_dropped": dropped,
        "cold_step_seconds": round(cold_seconds, 2),
        "equal": bool(torch.equal(first, reference)),
        "equal_after_drop": bool(torch.equal(cold, reference)),
        **_tiers_of(swapped),
    }


def _cgroup_dir() -> Path | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, controllers, path = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


def child_pair(args, setup: bool = True) -> dict[str, object]:
    """A high/low pair taking turns as WanVideoLooper calls them, under a memory cap set from inside:
    this process's anonymous RSS with both models loaded, plus `margin` bytes (less than the pair's swapped
    bytes: slabs for both would exceed it)."""
    import torch

    if setup:
        _setup_comfyui(args)
    high, low = _load(args, args.file), _load(args, args.file2)
    anon_loaded = anon_rss()
    with common.PeakPoller(interval=0.001, key="RssAnon") as poller:
        references = [_sample(high, 0), _sample(low, 1)]
    # What a sampling step needs beyond the models (activations, dequantized weights), with some slack for
    # what the poller missed: the cap leaves room for it, or any tier would be killed.
    step = poller.peak - anon_loaded + 32 * 2**20
    pair = [_block_swap(high, args.host_memory), _block_swap(low, args.host_memory)]
    anon_at_cap = anon_rss()
    limit = anon_at_cap + step + args.margin
    print(
        f"cap {limit} = anon {anon_at_cap} + step {step} + margin {args.margin}", file=sys.stderr, flush=True
    )
    cgroup = _cgroup_dir()
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    for path in (args.file, args.file2):
        drop_page_cache(path)
    equal = []
    for _turn in range(2):
        for seed, (model, reference) in enumerate(zip(pair, references, strict=True)):
            equal.append(bool(torch.equal(_sample(model, seed), reference)))
    return {
        "host_memory": args.host_memory,
        "limit": limit,
        "anon_at_cap": anon_at_cap,
        "step": step,
        "failcnt": int((cgroup / "memory.failcnt").read_text()),
        "anon_end": anon_rss(),
        "equal": equal,
        "tiers": [_tiers_of(m) for m in pair],
    }


def child_checks(args) -> dict[str, object]:
    """What tests/host/host_ram.py asserts, in one process (one ComfyUI import): for each loader, the
    anonymous RSS BlockSwap adds with host_memory=file and the outputs before and after the page cache is
    dropped; then a high/low pair taking turns under a cap (see `child_pair`)."""
    import torch

    _setup_comfyui(args)
    singles = []
    for loader in LOADERS:
        args.loader = loader
        model = _load(args, args.file)
        reference = _sample(model)
        unswapped = anon_rss()
        swapped = _block_swap(model, "file")
        first = _sample(swapped)
        added = anon_rss() - unswapped
        drop_page_cache(args.file)
        cold = _sample(swapped)
        singles.append(
            {
                "loader": loader,
                "added_by_blockswap": added,
                "equal": bool(torch.equal(first, reference)),
                "equal_after_drop": bool(torch.equal(cold, reference)),
                **_tiers_of(swapped),
            }
        )
        del model, swapped, first, cold, reference
        gc.collect()
    args.loader = "comfyui-gguf"
    return {"singles": singles, "pair": child_pair(args, setup=False)}


def run_child(args, kind: str, extra: list[str], prefix: list[str] | None = None) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--comfyui",
        args.comfyui,
        "--comfyui-gguf",
        args.comfyui_gguf,
    ]
    cmd += ["--package", str(args.package), "--loader", args.loader, *extra]
    if args.bf16_unet:
        cmd.append("--bf16-unet")
    proc = subprocess.run([*(prefix or []), *cmd], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comfyui", default=str(Path.home() / "comfy-hosts" / "0.33"))
    parser.add_argument("--comfyui-gguf", default=common.DEFAULT_COMFYUI_GGUF)
    parser.add_argument("--package", default=str(ROOT), help="checkout of this repository to measure")
    parser.add_argument("--loader", choices=LOADERS, default="comfyui-gguf")
    parser.add_argument("--preset", default="1.3b", help='synthetic_model preset, or "test" (default 1.3b)')
    parser.add_argument("--qtype", default="Q8_0")
    parser.add_argument("--tiers", nargs="*", default=list(TIERS), help='host_memory values ("before": none)')
    parser.add_argument("--bf16-unet", action="store_true", help="ComfyUI's --bf16-unet")
    parser.add_argument("--file", help="use this GGUF file instead of writing one")
    parser.add_argument("--file2", help=argparse.SUPPRESS)
    parser.add_argument("--host-memory", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--margin", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cgroup-limit", type=int, help="run each child in a cgroup v1 memory group of this size"
    )
    parser.add_argument("--workdir", help="keep the written file here (default: a temporary folder, deleted)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=["single", "pair", "checks"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "single":
        print(json.dumps(child_single(args)))
        return 0
    if args.child == "pair":
        print(json.dumps(child_pair(args)))
        return 0
    if args.child == "checks":
        print(json.dumps(child_checks(args)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wan_ram_tiers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        file = Path(args.file) if args.file else workdir / f"wan_{args.preset}_{args.qtype}.gguf"
        info = {"file_bytes": file.stat().st_size} if args.file else write_file(file, args.preset, args.qtype)
        prefix = None
        if args.cgroup_limit:
            # A small machine: only the children go into a memory cgroup (v1) with this limit.
            cgroup = Path("/sys/fs/cgroup/memory") / f"wan22_bench_{os.getpid()}"
            cgroup.mkdir()
            (cgroup / "memory.limit_in_bytes").write_text(str(args.cgroup_limit))
            prefix = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
        try:
            rows = [
                run_child(args, "single", ["--file", str(file), "--host-memory", tier], prefix)
                for tier in args.tiers
            ]
        finally:
            if args.cgroup_limit:
                cgroup.rmdir()
    finally:
        if not args.workdir:
            for p in workdir.iterdir():
                p.unlink()
            workdir.rmdir()
    result = {"comfyui": args.comfyui, "package": args.package, "file": info, "rows": rows}
    mib = 2**20
    print(f"File: {info['file_bytes'] / mib:,.0f} MiB, ComfyUI {args.comfyui}, loader {args.loader}")
    print(
        f"{'host_memory':<12}{'anon unswapped':>16}{'anon swapped':>14}{'added':>10}{'peak':>10}{'equal':>7}{'cold eq':>8}"
    )
    for row in rows:
        if "returncode" in row:
            print(f"{'?':<12} failed ({row['returncode']}): {row['stderr'][-300:]}")
            continue
        print(
            f"{row['host_memory']:<12}{row['anon_unswapped'] / mib:>14,.0f} M{row['anon_swapped'] / mib:>12,.0f} M"
            f"{row['added_by_blockswap'] / mib:>8,.0f} M{row['anon_swapped_peak'] / mib:>8,.0f} M"
            f"{row['equal']!s:>7}{row['equal_after_drop']!s:>8}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

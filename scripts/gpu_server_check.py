#!/usr/bin/env python3
"""The pack in a real ComfyUI server on the GPU: `main.py` of one checkout as users start it (no --cpu:
ComfyUI's default allocator and, on 0.16+, dynamic VRAM with aimdo), this repository in custom_nodes, on
a free loopback port (tests/host/comfy_server.py starts and stops it). Two tiny t2v prompts are queued:

- UNETLoader -> WAN 2.2 BlockSwap (2 of 4 blocks, prefetch 1, use_non_blocking, override_dynamic_vram so
  the engine also runs where ComfyUI's dynamic VRAM is on) -> KSampler -> SaveLatent;
- WAN BlockSwap Model Loader (auto_blocks_to_swap, prefetch 1, use_non_blocking) -> KSampler -> SaveLatent.

A prompt passes when it finishes with status "success". Exit status 0 when both do, 1 otherwise; the
server log goes to --log-dir.

    python scripts/gpu_server_check.py .hosts/ComfyUI-0.33 [--log-dir DIR] [--cpu]

--cpu starts the server with --cpu (to try this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TIMEOUT_S = 180
CHECKPOINT = "tiny_wan_t2v.safetensors"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The suite's server machinery and the tiny t2v prompt's sampling nodes (tests/host/comfy_server.py).
SERVER = _module("_wan22_comfy_server", ROOT / "tests" / "host" / "comfy_server.py")


def write_checkpoint(folder: Path) -> None:
    """The tiny WAN 2.1 t2v checkpoint of the host tests (4 blocks, dim 128), from the pack's synthetic model."""
    cli = _module("_wan22_gpu_server_cli", ROOT / "test_performance.py")
    pkg = cli.load_package()
    from safetensors.torch import save_file

    model = pkg.bench.synthetic_model.build_model("tiny", "t2v", seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / CHECKPOINT))


SWAP = {"offload_txt_emb": False, "offload_img_emb": False, "prefetch_blocks": 1, "use_non_blocking": True}


def blockswap_prompt() -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": CHECKPOINT, "weight_dtype": "default"}},
        "2": {
            "class_type": "wan22BlockSwap",
            "inputs": {"model": ["1", 0], "blocks_to_swap": 2, "override_dynamic_vram": True, **SWAP},
        },
        **SERVER.sample_and_save(["2", 0], "wan22_gpu/blockswap"),
    }


def combined_loader_prompt() -> dict:
    loader_inputs = {
        "model_type": "safetensors",
        "safetensors_model": CHECKPOINT,
        "gguf_model": "none",
        "wan_version": "auto",
        "model_variant": "auto",
        "fp8_optimization": "disabled",
        "weight_dtype": "auto",
    }
    return {
        "1": {
            "class_type": "WAN22BlockSwapLoader",
            "inputs": {**loader_inputs, "blocks_to_swap": 2, "auto_blocks_to_swap": True, **SWAP},
        },
        **SERVER.sample_and_save(["1", 0], "wan22_gpu/combined_auto"),
    }


def run_prompt(server_module, srv, name: str, prompt: dict) -> bool:
    started = time.monotonic()
    status, body = srv.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    if status != 200 or body.get("node_errors"):
        print(f"{name}: refused by /prompt: HTTP {status}: {body}", flush=True)
        return False
    try:
        entry = server_module.wait_for_history(srv, body["prompt_id"], PROMPT_TIMEOUT_S)
    except server_module.ServerError as err:
        print(f"{name}: {err}", flush=True)
        return False
    result = entry["status"]
    ok = result.get("status_str") == "success" and result.get("completed")
    verdict = "passed" if ok else f"failed: {result.get('messages')!r}"[-3000:]
    print(f"{name}: {verdict} ({time.monotonic() - started:.1f} s)", flush=True)
    return bool(ok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="a ComfyUI checkout (its main.py is started)")
    p.add_argument("--log-dir", type=Path, default=None, help="where the server log is copied")
    p.add_argument("--cpu", action="store_true", help="start the server with --cpu")
    args = p.parse_args(argv)
    server_module = SERVER
    checkout = args.checkout.resolve()
    root = Path(tempfile.mkdtemp(prefix="wan22_gpu_server_"))
    passed = False
    try:
        with server_module.running_server(
            checkout,
            root,
            prepare=lambda base: write_checkpoint(base / "models" / "diffusion_models"),
            gpu=not args.cpu,
        ) as srv:
            print(f"ComfyUI {checkout.name} server up in {srv.start_seconds:.1f} s on {srv.url}", flush=True)
            results = [
                run_prompt(server_module, srv, "BlockSwap (prefetch 1, non-blocking)", blockswap_prompt()),
                run_prompt(server_module, srv, "combined loader (auto)", combined_loader_prompt()),
            ]
            passed = all(results)
            if not passed:
                print(srv.tail(), flush=True)
    except server_module.ServerError as err:
        print(err, flush=True)
    finally:
        if args.log_dir is not None and (root / "server.log").is_file():
            args.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "server.log", args.log_dir / f"server_{checkout.name}.log")
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

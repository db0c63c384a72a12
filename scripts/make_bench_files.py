"""Write WAN-shaped benchmark files (random weights): a bf16 safetensors and a Q8_0 GGUF.

    python scripts/make_bench_files.py OUTDIR [--preset 14b] [--layers 10]

For scripts/gpu_check.sh's bench2 part (14B block shapes with fewer blocks); weights are drawn on the
GPU when there is one (drawing 14B shapes on a CPU takes minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("--preset", default="14b")
    p.add_argument("--layers", type=int, default=10)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("_cli", ROOT / "test_performance.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules["_cli"] = cli
    spec.loader.exec_module(cli)
    cli.load_package()
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import save_file

    from wan22_blockswap.bench import synthetic_model as sm
    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    init = "cuda" if torch.cuda.is_available() else "cpu"
    model = sm.build_model(args.preset, "t2v", num_layers=args.layers, dtype=torch.bfloat16, init_device=init)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"wan_{args.preset}_{args.layers}blocks"
    save_file(sd, str(out / f"{name}_bf16.safetensors"))
    write_wan_gguf(out / f"{name}_Q8_0.gguf", sd, lambda key, t: T.Q8_0)
    print(out / f"{name}_bf16.safetensors", out / f"{name}_Q8_0.gguf")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which UNet blocks hold a training step's activations: the basis of per-block checkpointing.

The memory planner knows the activations of a step with every UNet block checkpointed and with
none (``benchmarks/bench_activations.py``, real allocations at 1024 px). Budget-aware checkpointing
needs what each top-level block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) adds when it
alone is not checkpointed. This traces one forward pass of the UNet with its LoRA on fake tensors
(``lora_helpers.train.memory_trace``: nothing allocated, any config on any CPU) and counts the bytes
alive at its end, which the backward pass keeps: with every block checkpointed, with none, and with
every block checkpointed but one, for each block. Then it fits the planner's two figures (elements
saved per pixel x channel of a ResNet and of a transformer layer,
``lora_helpers.train.block_memory``) by least squares over the blocks, and prints each block's
measured share against the planner's.

    PYTHONPATH=. python benchmarks/bench_blocks.py          # SDXL at 1024 px, sdxl-small at 256 px (~5 min)

writes ``benchmarks/checkpoint_blocks_measured.json`` (read by tests/test_memory.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "checkpoint_blocks_measured.json"


def measure(unet_config: dict, resolution: int) -> dict:
    """Bytes alive at the end of the forward pass (GiB, fp16) for all, none, and all but each block."""
    from lora_helpers.train.block_memory import unet_blocks
    from lora_helpers.train.memory_trace import trace_training_memory

    blocks = unet_blocks(unet_config)

    def saved(checkpointed: list[str]) -> float:
        return trace_training_memory(unet_config, resolution=resolution, lora_rank=16, backward=False,
                                     gradient_checkpointing=checkpointed)["saved_gb"]

    every = saved(blocks)
    run = {"resolution": resolution, "all_gb": every, "none_gb": saved([]), "delta_gb": {}}
    for block in blocks:
        run["delta_gb"][block] = saved([b for b in blocks if b != block]) - every
        print(f"  {block:>14}: {run['delta_gb'][block]:.4f} GiB", flush=True)
    return run


def fit(unet_config: dict, run: dict) -> tuple[float, float]:
    """Least-squares elements per ResNet and per transformer layer (pixels x channels at 1/8 of the resolution)."""
    import torch

    from lora_helpers.train.block_memory import block_units

    latent_pixels = (run["resolution"] // 8) ** 2
    units = block_units(unet_config)
    rows = [(r * latent_pixels, t * latent_pixels, run["delta_gb"][b] * 2**30 / 2) for b, (r, t) in units.items()]
    a = torch.tensor([[r, t] for r, t, _ in rows], dtype=torch.float64)
    y = torch.tensor([[v] for *_, v in rows], dtype=torch.float64)
    solution = torch.linalg.lstsq(a, y).solution.flatten()
    return float(solution[0]), float(solution[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; keep the JSON as it is")
    args = parser.parse_args(argv)

    from lora_helpers.core.config import tiny_models_dir
    from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG, build_tiny_models
    from lora_helpers.train.block_memory import block_activation_weights

    small_dir = build_tiny_models(tiny_models_dir(build=False), small=True) / "sdxl-small" / "unet"
    small = {k: v for k, v in json.loads((small_dir / "config.json").read_text()).items() if not k.startswith("_")}
    cases = {"sdxl-1024": ("sdxl", dict(SDXL_UNET_CONFIG), 1024), "small-256": ("sdxl-small", small, 256)}
    out = {"date": datetime.date.today().isoformat(), "dtype": "float16", "lora_rank": 16,
           "how": "lora_helpers.train.memory_trace.trace_training_memory(backward=False): bytes of tensors alive at the "
                  "end of the forward pass on fake tensors; delta = all blocks checkpointed but one, minus all",
           "runs": {}}
    for name, (model, config, resolution) in cases.items():
        start = time.perf_counter()
        print(f"{name}: {model} UNet at {resolution} px", flush=True)
        run = {"model": model, **measure(config, resolution)}
        if model != "sdxl":
            run["unet_config"] = config
        resnet, transformer = fit(config, run)
        run["fitted_elements"] = {"resnet": round(resnet, 2), "transformer_layer": round(transformer, 2)}
        out["runs"][name] = run
        weights = block_activation_weights(config)
        total, saved = sum(weights.values()), sum(run["delta_gb"].values())
        print(f"  all {run['all_gb']:.4f} GiB, none {run['none_gb']:.4f} GiB, sum of deltas {saved:.4f} GiB; fitted "
              f"elements per ResNet {resnet:.2f}, per transformer layer {transformer:.2f} "
              f"[{time.perf_counter() - start:.0f} s]")
        print(f"  {'block':>14}  measured share  planner share")
        for block, delta in run["delta_gb"].items():
            print(f"  {block:>14}  {delta / saved:14.3f}  {weights[block] / total:13.3f}")
    if not args.no_write:
        OUT.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Activation memory of one SDXL LoRA training step, measured from real allocations on CPU.

The memory planner (``lora_helpers.train.memory``) adds an activation term to the frozen
weights; its coefficients were first found by tracing with fake tensors. This benchmark
measures them: the full-size SDXL UNet (random weights are enough: memory does not depend
on the values) in bf16 on CPU -- the same 2 bytes per element as fp16 on a GPU -- with the
LoRA added the way training adds it (peft, ``UNET_TARGET_MODULES``, rank 16, LoRA weights in
fp32, SDPA attention, bf16 autocast), one forward + backward at 1024 px.

How it is measured: ``torch.profiler`` with ``profile_memory=True`` records every allocation
and free of the CPU allocator made while it runs (address, bytes, time). The inputs and
weights exist before it starts, so the running sum of those records is the bytes allocated
by the step that are still alive, and its maximum is the step's peak above the weights. The
LoRA gradients (fp32, alive at the end of the backward pass) are part of that peak; they
are reported on their own and taken out of the activation figure, as the planner counts
them in another item. Host RSS sampled every 20 ms is the rough cross-check; the children run
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands large freed blocks back at once
(with its default, freed blocks stay in the heap and the RSS rise of a checkpointed step
is ~3.4 GiB against a 0.55 GiB allocator peak; ``--glibc-default`` keeps the default).

Each setting runs in its own process (one peak per process, nothing left over):

    PYTHONPATH=. python benchmarks/bench_activations.py --model /tmp/fsb/sdxl-full

writes ``benchmarks/activations_measured.json`` and prints a table against the planner.
Without gradient checkpointing the step is run at 1024 px when it fits the RSS limit
(``--rss-limit-gb``), else at 512 px and scaled by pixel count (the JSON says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
HERE = Path(__file__).resolve().parent


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class _RssWatch(threading.Thread):
    """Samples RSS; ends the process (exit code 3) above the limit instead of letting it swap or be killed."""

    def __init__(self, limit_gb: float):
        super().__init__(daemon=True)
        self.limit, self.peak, self.stop = limit_gb, 0.0, False

    def run(self):
        while not self.stop:
            rss = _rss_gb()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                print(f"RSS {rss:.1f} GB over the {self.limit} GB limit: stopping", flush=True)
                os._exit(3)
            time.sleep(0.02)


def measure(model: str, mode: str, resolution: int, rank: int, rss_limit_gb: float) -> dict:
    """One step of ``mode`` ("checkpointed", "full" or "inference") in this process."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from torch.profiler import ProfilerActivity, profile

    from lora_helpers.core.lora_files import UNET_TARGET_MODULES

    torch.manual_seed(0)
    dtype = torch.bfloat16
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant="fp16", torch_dtype=dtype)
    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    lora_params = 0
    if mode != "inference":
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(UNET_TARGET_MODULES)))
        cast_training_params([unet], dtype=torch.float32)
        lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        unet.train()
        if mode == "checkpointed":
            unet.enable_gradient_checkpointing()
    else:
        unet.eval()
    batch = 2 if mode == "inference" else 1  # classifier-free guidance: two halves per call
    latent = resolution // 8
    x = torch.randn(batch, 4, latent, latent, dtype=dtype)
    t = torch.full((batch,), 500, dtype=torch.long)
    text = torch.randn(batch, 77, 2048, dtype=dtype)
    added = {"text_embeds": torch.randn(batch, 1280, dtype=dtype), "time_ids": torch.randn(batch, 6, dtype=dtype)}
    target = torch.randn_like(x, dtype=torch.float32)

    def step():
        if mode == "inference":
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                unet(x, t, text, added_cond_kwargs=added).sample
            return None
        with torch.autocast("cpu", dtype=dtype):
            pred = unet(x, t, text, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        return float(loss.detach())

    rss_before = _rss_gb()
    watch = _RssWatch(rss_limit_gb)
    watch.start()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    seconds = time.perf_counter() - start
    watch.stop = True
    records = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]"), key=lambda r: r[0])
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in unet.parameters() if p.grad is not None)
    return {"mode": mode, "resolution": resolution, "batch_size": batch, "lora_rank": rank,
            "lora_parameters": lora_params, "allocator_peak_gb": peak / GIB,
            "lora_gradients_gb": grads / GIB, "activations_gb": (peak - grads) / GIB,
            "live_at_end_gb": live / GIB, "allocation_records": len(records),
            "rss_before_step_gb": rss_before, "rss_step_peak_gb": watch.peak,
            "rss_rise_gb": watch.peak - rss_before, "seconds": seconds, "loss": loss}


def _run_child(args, mode: str, resolution: int) -> dict | None:
    cmd = [sys.executable, __file__, "--model", args.model, "--child", mode, "--resolution", str(resolution),
           "--rank", str(args.rank), "--rss-limit-gb", str(args.rss_limit_gb)]
    env = dict(os.environ) if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{mode} at {resolution} px failed (exit {done.returncode}):\n{done.stdout[-800:]}{done.stderr[-1500:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _planned(mode: str, resolution: int, rank: int) -> float:
    from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG
    from lora_helpers.train.memory import estimate_peak_memory

    plan = estimate_peak_memory(unet_config=SDXL_UNET_CONFIG, resolution=resolution, batch_size=1, lora_rank=rank,
                                weight_dtype="bf16", gradient_checkpointing=mode != "full", device_type="cpu")
    return next(v for k, v in plan.items.items() if k.startswith("activations"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="/tmp/fsb/sdxl-full", help="SDXL folder in the hub's fp16 layout")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rss-limit-gb", type=float, default=15.5)
    parser.add_argument("--modes", default="checkpointed,full,inference")
    parser.add_argument("--out", default=str(HERE / "activations_measured.json"))
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc settings (RSS less useful)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child:
        result = measure(args.model, args.child, args.resolution, args.rank, args.rss_limit_gb)
        print(json.dumps(result))
        return

    results = {}
    for mode in args.modes.split(","):
        result = _run_child(args, mode, args.resolution)
        if result is None and mode == "full" and args.resolution > 512:
            result = _run_child(args, mode, 512)
            if result is not None:
                scale = (args.resolution / 512) ** 2
                result["measured_at_resolution"] = 512
                result["scaled_to_resolution"] = args.resolution
                result["scaled_activations_gb"] = result["activations_gb"] * scale
        if result is not None:
            results[mode] = result
    table = []
    for mode, r in results.items():
        measured = r.get("scaled_activations_gb", r["activations_gb"])
        planned = _planned(mode, args.resolution, args.rank) if mode != "inference" else None
        table.append((mode, r["resolution"], r["batch_size"], measured, r["lora_gradients_gb"], r["rss_rise_gb"],
                      planned, r["seconds"]))
    print(f"{'mode':<13}{'px':>6}{'batch':>6}{'activ. GiB':>12}{'LoRA grad':>10}{'RSS rise':>10}"
          f"{'planned':>9}{'s':>7}")
    for mode, px, b, m, g, rss, planned, s in table:
        p = f"{planned:9.2f}" if planned is not None else f"{'-':>9}"
        print(f"{mode:<13}{px:>6}{b:>6}{m:12.3f}{g:10.3f}{rss:10.2f}{p}{s:7.0f}")
    out = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "dtype": "bfloat16",
           "device": "cpu", "model": "SDXL 1.0 base UNet config, random weights",
           "how": "torch.profiler profile_memory=True: running sum of CPU allocator records over one step; "
                  "activations = peak minus the LoRA gradients (fp32)",
           "rss_note": "RSS rise: host RSS sampled every 20 ms during the step minus before it, "
                       + ("glibc defaults" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536")
                       + "; it also holds oneDNN scratch and the profiler's records",
           "resolution": args.resolution, "lora_rank": args.rank, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Batched vs one-by-one BLIP captioning, on the BLIP-base architecture with random weights.

The real BLIP-base (``Salesforce/blip-image-captioning-base``) has the same shapes as
``BlipConfig()``'s defaults: a ViT-B/16 image encoder at 384 px and a BERT-base text
decoder. Random weights caption nonsense, but every caption here is forced to the same
length (``--tokens``), so the work per image equals a real caption of that length and
the timings are those of the real model.

The two runners alternate (one-by-one, batched, one-by-one, ...) ``--repeats`` times, so a
burst of other work on a shared machine hits both; the table gives each one's min and median
seconds per image, wall-clock and CPU (the CPU time of this process leaves out the time it
waited for a core), and the speed-up of batching from each.

Run from the repository root (CPU, two threads by default; several minutes):

    python benchmarks/bench_caption.py
    python benchmarks/bench_caption.py --images 16 --batch-size 8 --num-beams 3 --tokens 20 --repeats 3

On a machine whose cores are busy with other work, ``--threads 1`` is several times faster
than two threads (two OpenMP threads then wait on each other), so compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_helpers.caption import generate_captions  # noqa: E402


def _bert_vocab_folder(folder: Path, size: int) -> Path:
    """A WordPiece vocabulary with BLIP's special-token ids ([DEC] = 30522), filler elsewhere."""
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]"}
    vocab = [specials.get(i, f"w{i}") for i in range(size)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "mask_token": "[MASK]", "bos_token": "[DEC]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_blip_base(seed: int = 0):
    """BLIP-base captioning model (random weights) and a processor like the real one."""
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    config = BlipConfig()  # defaults = blip-image-captioning-base shapes
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(_bert_vocab_folder(Path(tmp), config.text_config.vocab_size))
    image_processor = BlipImageProcessorPil(size={"height": 384, "width": 384})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _photos(n: int) -> list[Image.Image]:
    """Different crops of scikit-image's astronaut photo (public domain), 512 px."""
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        side = int(rng.integers(200, 512))
        left, top = (int(rng.integers(0, 512 - side + 1)) for _ in range(2))
        out.append(photo.crop((left, top, left + side, top + side)).resize((512, 512)))
    return out


def _plain_generate(images, *, model, processor, batch_size: int, num_beams: int, max_new_tokens: int,
                    min_new_tokens: int, repetition_penalty: float, progress: bool) -> list[str]:
    """Captions from ``BlipForConditionalGeneration.generate`` as it comes: what ours must equal."""
    out = []
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start:start + batch_size], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
        out += [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens (fixed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each runner, alternated")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, processor = build_blip_base()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"BLIP-base architecture, random weights: {n_params:.0f} M parameters, built in "
          f"{time.perf_counter() - t0:.1f} s; CPU, {args.threads} threads, torch {torch.__version__}")
    images = _photos(args.images)
    kw = dict(model=model, processor=processor, num_beams=args.num_beams, max_new_tokens=args.tokens,
              min_new_tokens=args.tokens, repetition_penalty=1.3, progress=False)
    generate_captions(images[:1], batch_size=1, **kw)  # warm-up: first-call allocations

    runners = {"one-by-one": 1, f"batched ({args.batch_size})": args.batch_size}
    wall: dict[str, list[float]] = {label: [] for label in runners}
    cpu: dict[str, list[float]] = {label: [] for label in runners}
    captions: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for label, batch_size in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            captions[label] = generate_captions(images, batch_size=batch_size, **kw)
            wall[label].append((time.perf_counter() - start) / args.images)
            cpu[label].append((time.process_time() - start_cpu) / args.images)
            print(f"  run {repeat + 1}/{args.repeats} {label:<14} {wall[label][-1]:.2f} s/image "
                  f"({cpu[label][-1]:.2f} s CPU)", flush=True)
    print(f"{'s/image':<14} {'min':>8} {'median':>8} {'min CPU':>8} {'median CPU':>11}")
    for label in runners:
        print(f"{label:<14} {min(wall[label]):8.2f} {statistics.median(wall[label]):8.2f} "
              f"{min(cpu[label]):8.2f} {statistics.median(cpu[label]):11.2f}")
    one, batched = runners
    print(f"speed-up from batching: {min(wall[one]) / min(wall[batched]):.2f}x (min), "
          f"{statistics.median(wall[one]) / statistics.median(wall[batched]):.2f}x (median); CPU time: "
          f"{min(cpu[one]) / min(cpu[batched]):.2f}x (min), "
          f"{statistics.median(cpu[one]) / statistics.median(cpu[batched]):.2f}x (median)")
    c1, cb = captions[one], captions[batched]
    same = sum(a == b for a, b in zip(c1, cb))
    print(f"identical captions: {same}/{args.images} (beam search {args.num_beams}, {args.tokens} tokens per caption)")
    start = time.perf_counter()
    plain = _plain_generate(images, batch_size=args.batch_size, **kw)
    print(f"transformers' own BLIP generate, batched ({args.batch_size}), once: "
          f"{(time.perf_counter() - start) / args.images:.2f} s/image; the same captions: "
          f"{sum(a == b for a, b in zip(plain, cb))}/{args.images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizers for the tiny models: CLIP BPE and BLIP WordPiece vocabularies learned from a small corpus.

Built with ``from_pretrained(folder)`` later (transformers 5 ignores file arguments such as
``vocab_file=``), so they are written as the files a hub tokenizer folder holds.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

__all__ = ["write_clip_tokenizer", "write_blip_tokenizer"]

# Words the tiny tokenizers learn as whole tokens: what our prompts and captions use,
# so that token counts in smoke mode look like real ones ("TOK person" -> 2 tokens).
_CORPUS = """
a an the of in on at with and or for to from by is are was were be it its this that
photo photograph picture portrait close up closeup selfie headshot image painting drawing sketch
tok sks ohwx person man woman boy girl child people face head hair eyes nose mouth smile smiling
young old adult lady guy gentleman wearing shirt suit jacket dress hat glasses tie uniform
standing sitting walking running holding looking posing smiling laughing front behind near next
building street city park beach mountain forest room kitchen office table chair window wall sky
background white black red blue green yellow orange purple pink brown gray grey dark light bright
flag space astronaut nasa navy officer computer book cup coffee dog cat car tree grass water snow
style oil watercolor anime cartoon cinematic lighting high quality detailed realistic professional
blurry low worst bad deformed ugly lowres jpeg artifacts watermark text signature cropped
in front of there is arafed arafe man's woman's long short curly straight
astronaut suit grace hopper
""".split()
_SPECIAL_WEIGHT = {"tok": 50, "person": 50, "photo": 40, "a": 60, "of": 40}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to
    # unused code points, so every byte string has a visible, reversible spelling.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_bpe(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges (CLIP style: the last symbol of a word carries ``</w>``)."""
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, freq in words.items():
            syms = split[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w in words:
            syms, out, i = split[w], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            split[w] = tuple(out)
    return merges


def write_clip_tokenizer(folder: str | os.PathLike, *, num_merges: int = 600, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, config) learned from a small corpus.

    Args:
        folder: output folder; load it with ``CLIPTokenizer.from_pretrained(folder)``.
        num_merges: number of BPE merges (vocabulary size is about 512 + this).
        pad_token: SDXL's first tokenizer pads with ``<|endoftext|>``, the second with ``!``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = Counter({w.lower(): _SPECIAL_WEIGHT.get(w.lower(), 5) for w in _CORPUS if re.fullmatch(r"[a-z']+", w.lower())})
    merges = _learn_bpe(words, num_merges)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,  # transformers v5 does not infer CLIP's limit from the vocabulary
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}), encoding="utf-8"
    )
    return folder


def write_blip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a BERT WordPiece tokenizer like BLIP's (with the ``[DEC]`` start token).

    Returns:
        The folder; load it with ``AutoTokenizer.from_pretrained(folder)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = list(dict.fromkeys(w.lower() for w in _CORPUS))
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz.,'-")
    (folder / "vocab.txt").write_text("\n".join(specials + words + pieces) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 512,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "bos_token": "[DEC]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder

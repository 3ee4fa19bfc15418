"""Pivotal tuning on the tiny SDXL: new tokens learn in both text encoders, freeze, save, reload and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import image_diff, make_dataset, max_diff

from lora_helpers.core.config import HUB_MODELS
from lora_helpers.core.embeddings import (EmbeddingFileError, find_embedding_file, pivotal_token_count,
                                          read_embeddings)
from lora_helpers.train import TrainConfig, plan_memory, train
from lora_helpers.train.data import TrainImage
from lora_helpers.train.pivotal import add_pivotal_tokens, pivotal_captions

STEPS = 6


def _config(tiny_models, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models / "sdxl"), checkpointing_steps=1, checkpoints_total_limit=2, validation_steps=0,
                validation_prompts=(), progress=False, max_train_steps=STEPS, pivotal_tokens=2, pivotal_lr=5e-2,
                learning_rate=1e-2, lr_scheduler="constant", fixed_noise=True, snr_gamma=None)
    return TrainConfig.from_preset("cpu-smoke", **{**base, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def pivotal_run(dataset, tiny_models, tmp_path_factory):
    captured = {}

    def hook(step, images, run_dir):
        captured[step] = images

    cfg = _config(tiny_models, validation_prompts=("a photo of {subject}",), validation_seeds=(3,))
    result = train(dataset, tmp_path_factory.mktemp("pivotal"), config=cfg, validation_hook=hook)
    return result, captured, cfg


def _card_snippet(run_dir, starting: str) -> str:
    """The lines of the model card's diffusers code from the one that starts with ``starting`` to the end of the block."""
    code = (run_dir / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    lines = code.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(starting))
    last = next(i for i, line in enumerate(lines) if line.startswith("image = pipe"))
    return "\n".join(lines[first:last])


def _rows(folder):
    return read_embeddings(find_embedding_file(folder))


def test_new_token_rows_learn_then_freeze(pivotal_run):
    result, _, cfg = pivotal_run
    run = result.run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["trigger"] == "<s0><s1> person"
    assert config["pivotal"] == {"tokens": ["<s0>", "<s1>"], "freeze_step": 3, "file": "lora_emb.safetensors"}
    ckpt = {s: _rows(run / "checkpoints" / f"checkpoint-{s}") for s in range(1, STEPS + 1)}
    # trained for the first half: each step moves both tokens in both encoders
    for a, b in ((1, 2), (2, 3)):
        for name in ("clip_l", "clip_g"):
            moved = (getattr(ckpt[a], name) - getattr(ckpt[b], name)).abs().amax(dim=1)
            assert (moved > 1e-4).all(), f"{name} rows did not move between steps {a} and {b}"
    # frozen from step 3 on, and the final file is the frozen rows
    for s in range(4, STEPS + 1):
        torch.testing.assert_close(ckpt[s].clip_l, ckpt[3].clip_l, rtol=0, atol=0)
        torch.testing.assert_close(ckpt[s].clip_g, ckpt[3].clip_g, rtol=0, atol=0)
    final = _rows(run)
    torch.testing.assert_close(final.clip_g, ckpt[3].clip_g, rtol=0, atol=0)
    # and the LoRA kept learning after the freeze
    a = load_file(run / "checkpoints" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "pytorch_lora_weights.safetensors")
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)


def test_only_the_new_rows_train(tiny_models):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tiny_models / "sdxl"
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")]
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    for te in encoders:
        te.requires_grad_(False)
    before = [te.state_dict() for te in encoders]
    before = [{k: v.clone() for k, v in sd.items()} for sd in before]
    state = add_pivotal_tokens(encoders, tokenizers, n_tokens=2, init_word="person", seed=0, freeze_step=10)
    start = [p.detach().clone() for p in state.params]
    assert [p for te in encoders for p in te.parameters() if p.requires_grad] == state.params
    optimizer = torch.optim.AdamW(state.params, lr=1e-2)
    ids = tokenizers[0](["a photo of <s0><s1> person"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids >= len(tokenizers[0]) - 2).sum() == 2  # the identifier is two tokens, not "<", "s", "0", ">"
    for _ in range(3):
        loss = sum(te(ids, output_hidden_states=True).hidden_states[-2].pow(2).mean() for te in encoders)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for p, s in zip(state.params, start):
        assert (p - s).abs().amax(dim=1).min() > 1e-4, "every new row must train"
    for te, sd in zip(encoders, before):
        after = {k.replace(".base.", "."): v for k, v in te.state_dict().items() if not k.endswith(".rows")}
        assert after.keys() == sd.keys()
        for key in sd:
            assert torch.equal(after[key], sd[key]), f"{key} changed"


def test_pooled_output_stays_at_the_end_token_with_sdxls_legacy_config(tiny_models):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = tiny_models / "sdxl"
    # SDXL's text encoder configs say eos_token_id=2: transformers then pools at the highest id
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder=s, eos_token_id=2) for s in ("text_encoder",) * 2]
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer") for _ in range(2)]
    add_pivotal_tokens(encoders, tokenizers, n_tokens=2, init_word="person", seed=0, freeze_step=1)
    ids = tokenizers[0](["a photo of <s0><s1> person"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    end = int((ids[0] == tokenizers[0].eos_token_id).nonzero()[0])
    out = encoders[0](ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, end])


def test_lora_and_embeddings_reload_into_a_fresh_pipeline(pivotal_run, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    from lora_helpers.generate import activate_lora, load_lora, load_pipeline

    result, captured, cfg = pivotal_run
    in_memory = captured[STEPS][0]
    kwargs = dict(prompt="a photo of <s0><s1> person", num_inference_steps=cfg.validation_inference_steps,
                  guidance_scale=cfg.validation_guidance_scale, height=64, width=64)

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images[0]

    # ours: load_lora finds the embeddings beside the LoRA
    pipe = load_pipeline(str(tiny_models / "sdxl"))
    info = load_lora(pipe, result.run_dir)
    assert info.trigger == "<s0><s1> person" and info.embedding_path.name == "lora_emb.safetensors"
    ours = render(pipe)
    # the model card's diffusers code: load_lora_weights + load_textual_inversion per encoder
    card = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    card.load_lora_weights(result.run_dir)
    assert f'load_file("{result.run_dir.name}/lora_emb.safetensors")' in (result.run_dir / "README.md").read_text()
    emb = load_file(result.run_dir / "lora_emb.safetensors")
    card.load_textual_inversion(emb["clip_l"], token=["<s0>", "<s1>"], text_encoder=card.text_encoder,
                                tokenizer=card.tokenizer)
    card.load_textual_inversion(emb["clip_g"], token=["<s0>", "<s1>"], text_encoder=card.text_encoder_2,
                                tokenizer=card.tokenizer_2)
    exec(_card_snippet(result.run_dir, "# pool at the end-of-text token"), {"pipe": card})
    from_card = render(card)
    # the LoRA alone, without the learned tokens
    lora_only = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    lora_only.load_lora_weights(result.run_dir)
    without = render(lora_only)

    assert max_diff(ours, in_memory) <= 1, "the saved LoRA + embeddings must reproduce the in-memory model"
    assert max_diff(from_card, ours) <= 1, "the model card's diffusers code must give the same picture"
    assert image_diff(without, ours) > 1, "the learned tokens should matter"
    # the base model gets the base vocabulary back, and the tokens return with the LoRA
    n = len(pipe.tokenizer)
    activate_lora(pipe, None)
    assert len(pipe.tokenizer) == n - 2 and len(pipe.tokenizer_2) == len(card.tokenizer_2) - 2
    activate_lora(pipe, info)
    assert max_diff(render(pipe), ours) <= 1


def test_embedding_file_is_the_sdxl_format_a1111_and_comfyui_read(pivotal_run, tiny_models, tmp_path):
    result, _, _ = pivotal_run
    path = result.run_dir / "lora_emb.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}
        assert f.metadata()["tokens"] == "<s0>,<s1>"
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    widths = [json.loads((tiny_models / "sdxl" / s / "config.json").read_text())["hidden_size"]
              for s in ("text_encoder", "text_encoder_2")]
    assert shapes == {"clip_l": (2, widths[0]), "clip_g": (2, widths[1])}
    assert dtypes == {torch.float32}
    card = (result.run_dir / "README.md").read_text()
    assert "ComfyUI/models/embeddings/" in card and "embedding:lora_emb" in card and "load_textual_inversion" in card
    # a damaged or foreign file is named, with the reason
    broken = tmp_path / "broken_emb.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EmbeddingFileError, match="broken_emb.safetensors"):
        read_embeddings(broken)
    one_key = tmp_path / "sd15_emb.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(one_key))
    with pytest.raises(EmbeddingFileError, match="no clip_l or clip_g"):
        read_embeddings(one_key)


def test_resume_with_pivotal_tuning_equals_an_uninterrupted_run(dataset, tiny_models, tmp_path):
    cfg = _config(tiny_models, checkpointing_steps=2, checkpoints_total_limit=3, fixed_noise=False,
                  validation_steps=2, validation_prompts=("a photo of {subject}",))
    straight = train(dataset, tmp_path / "straight", config=cfg)
    for stop in (2, 4):  # before the tokens freeze (at 3), and after
        def disconnect(step, images, run_dir, stop=stop):
            if step == stop:
                raise KeyboardInterrupt
        run = tmp_path / f"resumed-{stop}"
        with pytest.raises(KeyboardInterrupt):
            train(dataset, run, config=cfg, validation_hook=disconnect)
        resumed = train(dataset, run, config=cfg, resume="latest")
        a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
        ea, eb = _rows(straight.run_dir), _rows(resumed.run_dir)
        torch.testing.assert_close(ea.clip_l, eb.clip_l, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ea.clip_g, eb.clip_g, rtol=1e-5, atol=1e-6)
        losses = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
        assert losses == pytest.approx([json.loads(x)["loss"] for x in
                                        (straight.run_dir / "log.jsonl").read_text().splitlines()], rel=1e-5)


def test_the_identifier_becomes_the_new_tokens_on_word_boundaries():
    images = [TrainImage(file_name="a.png", path=None, caption="a photo of TOK person near tokyo, TOKEN"),
              TrainImage(file_name="b.png", path=None, caption="tok person smiling")]
    out, trigger = pivotal_captions(images, "TOK person", 2)
    assert trigger == "<s0><s1> person"
    assert [im.caption for im in out] == ["a photo of <s0><s1> person near tokyo, TOKEN", "<s0><s1> person smiling"]
    assert images[0].caption.startswith("a photo of TOK")  # the dataset's own captions are not touched
    same, _ = pivotal_captions(out, "<s0><s1> person", 2)
    assert [im.caption for im in same] == [im.caption for im in out]
    with pytest.raises(ValueError, match="pivotal_tokens=2"):
        pivotal_captions(out, "<s0><s1> person", 3)
    assert pivotal_token_count("<s0><s1>") == 2 and pivotal_token_count("TOK") == 0


def test_plan_counts_the_text_encoders_until_the_tokens_freeze_and_fits_a_t4():
    # named: smoke mode would swap in the tiny model
    # the same step in both ("auto" would give the plain run's spare memory to fewer checkpointed blocks or batch 2)
    same = dict(model=HUB_MODELS.sdxl, gradient_checkpointing="all", train_batch_size=1)
    plain = plan_memory(TrainConfig.from_preset("t4-8gb", **same))
    pivotal = plan_memory(TrainConfig.from_preset("t4-8gb", pivotal_tokens=2, **same))
    extra = pivotal.train_peak_gb - plain.train_peak_gb
    # both CLIP text encoders in fp16 (817 M parameters) and their activations for one caption
    assert 817e6 * 2 / 2**30 < extra < 817e6 * 2 / 2**30 + 0.2
    assert pivotal.fits, pivotal
    # validation images are made with the encoders in host RAM: no higher than without new tokens
    assert pivotal.validation_peak_gb == pytest.approx(plain.validation_peak_gb, abs=0.01)
    assert any("new tokens" in k for k in pivotal.items)
    assert plan_memory(TrainConfig.from_preset("t4-8gb", model=HUB_MODELS.sdxl, pivotal_tokens=2)).fits  # with "auto"


def test_captions_written_with_new_tokens_train_them(tiny_models, tmp_path, capsys):
    from lora_helpers.cli import main
    from train_helpers import make_dataset as make

    dataset = make(tmp_path / "ds", n=4, with_captions=False)
    assert main(["caption", str(dataset), "--format", "pivotal", "--model", str(tiny_models / "blip"),
                 "--max-new-tokens", "8"]) == 0
    rows = [json.loads(x) for x in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert all(r["text"].count("<s0><s1> person") == 1 for r in rows), [r["text"] for r in rows]
    assert json.loads((dataset / "caption_config.json").read_text())["pivotal_tokens"] == ["<s0>", "<s1>"]
    capsys.readouterr()
    assert main(["train", str(dataset), str(tmp_path / "run"), "--preset", "cpu-smoke", "--model",
                 str(tiny_models / "sdxl"), "--steps", "2", "--validate-every", "0"]) == 0
    assert "training them (pivotal_tokens=2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pivotal"]["tokens"] == ["<s0>", "<s1>"]
    # asking for another number of tokens than the captions carry is refused, naming both
    assert main(["train", str(dataset), str(tmp_path / "run3"), "--preset", "cpu-smoke", "--pivotal", "3",
                 "--model", str(tiny_models / "sdxl"), "--steps", "2"]) != 0
    assert "--pivotal 2" in capsys.readouterr().err

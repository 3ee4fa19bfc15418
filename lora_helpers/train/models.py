"""The models a run trains: the frozen UNet with its LoRA (and optionally text-encoder LoRAs),
the optimizer and the schedulers, prepared by accelerate.

The frozen weights take the mixed-precision dtype (fp16 on a T4) while the LoRA weights stay
fp32: fp16 gradients cannot be unscaled by the GradScaler, and fp16 Adam updates underflow.
diffusers, peft and transformers are imported inside the functions: together they cost
several seconds to import, and a notebook that only builds a config needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_helpers.core.lora_files import TEXT_ENCODER_TARGET_MODULES, add_text_encoder_lora
from lora_helpers.train.block_memory import checkpointed_blocks
from lora_helpers.train.config import TrainConfig
from lora_helpers.train.latents import load_component
from lora_helpers.train.pivotal import PivotalState, add_pivotal_tokens

__all__ = ["TrainingModels", "weight_dtype", "build_models", "enable_block_checkpointing", "encode_live"]

_TEXT_ENCODER_TARGETS = list(TEXT_ENCODER_TARGET_MODULES)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights: fp16/bf16 under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


@dataclass
class TrainingModels:
    """What :func:`build_models` made (the modules and optimizer wrapped by accelerate).

    Attributes:
        unet: the UNet with its LoRA adapter.
        text_encoders: both text encoders with LoRAs, or (None, None) when they are not trained.
        tokenizers: their tokenizers, or (None, None).
        params: the trainable (LoRA) parameters, for gradient clipping.
        optimizer, lr_scheduler: AdamW (8-bit on CUDA) and its schedule.
        noise_scheduler: the model's DDPM scheduler (noise levels of the training).
        pivotal: the new tokens and their trainable rows (pivotal tuning), or None.
    """

    unet: Any
    text_encoders: tuple
    tokenizers: tuple
    params: list
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    pivotal: PivotalState | None = None


def build_models(cfg: TrainConfig, accelerator, *, class_noun: str = "person", n_tokens: int | None = None) -> TrainingModels:
    """Load the frozen UNet, add the LoRA, and prepare models and optimizer with accelerate.

    Args:
        cfg: a resolved config (model, precision, optimizer, steps and warm-up filled in).
        accelerator: the run's ``accelerate.Accelerator``.
        class_noun: the new tokens of pivotal tuning start from this word's embedding.
        n_tokens: how many new tokens in all (several people: ``pivotal_tokens`` each); None: ``pivotal_tokens``.

    Returns:
        A :class:`TrainingModels`, in training mode.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    device, dtype = accelerator.device, weight_dtype(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)  # the LoRA's initial weights are a function of the seed
    if cfg.unet_8bit:
        unet = _load_unet_8bit(cfg.model, device)
    elif cfg.unet_4bit:
        unet = _load_unet_4bit(cfg.model, device, dtype)
    else:
        unet = load_component(UNet2DConditionModel, cfg.model, subfolder="unet", dtype=dtype).to(device)
    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA: no attention matrix in memory
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
    models, tokenizers, text_encoders = [unet], (None, None), None
    if cfg.train_text_encoder:
        text_encoders, tokenizers = _load_text_encoders(cfg, device, dtype)
        models += text_encoders
    elif cfg.pivotal_tokens:
        # frozen, not wrapped by accelerate: only the new rows train, and their gradients are
        # averaged over processes by the step (DDP would wait for rows that stop training)
        text_encoders, tokenizers = _load_text_encoders(cfg, device, dtype, lora=False)
    # LoRA weights in fp32 under an fp16 UNet: fp16 gradients cannot be unscaled by the GradScaler
    cast_training_params(models, dtype=torch.float32)
    if enable_block_checkpointing(unet, checkpointed_blocks(dict(unet.config), cfg.gradient_checkpointing,
                                                            tuple(cfg.target_modules))):
        for te in models[1:]:
            # transformers 5 renamed it; older versions only have the first name
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    for te in models[1:]:
        groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.text_encoder_lr})
    pivotal = None
    if cfg.pivotal_tokens:
        pivotal = add_pivotal_tokens(text_encoders, tokenizers, n_tokens=n_tokens or cfg.pivotal_tokens,
                                     init_word=class_noun,
                                     seed=cfg.seed, freeze_step=round(cfg.max_train_steps * cfg.pivotal_freeze_fraction))
        groups.append({"params": pivotal.params, "lr": cfg.pivotal_lr, "name": "pivotal"})
    optimizer = _make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    noise_scheduler = DDPMScheduler.from_pretrained(cfg.model, subfolder="scheduler")
    prepared = accelerator.prepare(*models, optimizer)
    for m in prepared[:-1]:
        m.train()
    if cfg.compile_unet:  # the training step runs the compiled UNet; saving and validation unwrap it (accelerate)
        prepared = (torch.compile(prepared[0]), *prepared[1:])
    encoders = tuple(prepared[1:3]) if cfg.train_text_encoder else tuple(text_encoders or (None, None))
    return TrainingModels(unet=prepared[0], text_encoders=encoders, tokenizers=tokenizers,
                          params=[p for g in groups for p in g["params"]], optimizer=prepared[-1],
                          lr_scheduler=lr_scheduler, noise_scheduler=noise_scheduler, pivotal=pivotal)


def enable_block_checkpointing(unet, blocks: list[str]) -> bool:
    """Checkpoint these top-level UNet blocks only (``down_blocks.1``, ``mid_block``, ...), the rest not.

    diffusers switches checkpointing per module: a block's flag recomputes its ResNets, each
    transformer's flag its layers. ``enable_gradient_checkpointing`` sets every flag (and the
    function they call); the flags outside ``blocks`` are then cleared.

    Args:
        unet: the UNet (peft-wrapped or not).
        blocks: names from :func:`lora_helpers.train.block_memory.checkpointed_blocks`.

    Returns:
        True when any block is checkpointed.
    """
    unet.disable_gradient_checkpointing()
    if not blocks:
        return False
    unet.enable_gradient_checkpointing()
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing") and not any(name == b or name.startswith(b + ".") for b in blocks):
            module.gradient_checkpointing = False
    return True


def _load_text_encoders(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, *,
                        lora: bool = True) -> tuple[list, tuple]:
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    te1 = load_component(CLIPTextModel, cfg.model, subfolder="text_encoder", dtype=dtype).to(device)
    te2 = load_component(CLIPTextModelWithProjection, cfg.model, subfolder="text_encoder_2", dtype=dtype).to(device)
    for te in (te1, te2):
        te.requires_grad_(False)
        if not lora:
            te.eval()  # frozen: no dropout, whatever the model's config says
            continue
        add_text_encoder_lora(te, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                             target_modules=_TEXT_ENCODER_TARGETS))
    tokenizers = (CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer"),
                  CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer_2"))
    return [te1, te2], tokenizers


def _make_optimizer(cfg: TrainConfig, groups: list[dict]):
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional (the cuda extra)
        except ImportError as exc:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes), "
                              "or use optimizer='adamw' (more memory)") from exc
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **kwargs)
    # foreach: one kernel per operation for all LoRA tensors (the default on CUDA); on CPU the default
    # loops over them in Python, slower for the same result
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=True, **kwargs)


def _load_unet_8bit(model: str, device: torch.device):
    """The frozen UNet with its Linear layers stored in 8 bits (bitsandbytes, CUDA only)."""
    if device.type != "cuda":
        raise ValueError("unet_8bit needs a CUDA GPU (bitsandbytes 8-bit matmuls); on CPU train in fp32")
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    return load_component(UNet2DConditionModel, model, subfolder="unet", dtype=torch.float16,
                          quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device.index or 0})


def _load_unet_4bit(model: str, device: torch.device, dtype: torch.dtype):
    """The frozen UNet with its Linear layers in 4 bits (NF4 + double quantization), QLoRA-style.

    The same ``from_pretrained`` load as always, then every Linear layer is swapped for a
    bitsandbytes ``Linear4bit``; the weights are quantized when moved to the device. Done here
    rather than through diffusers' quantization config, which refuses to run without a GPU:
    this way the path also runs (slowly) on CPU, where tests check it.
    """
    import bitsandbytes as bnb
    from diffusers import UNet2DConditionModel

    unet = load_component(UNet2DConditionModel, model, subfolder="unet", dtype=dtype)
    compute = dtype if device.type == "cuda" else torch.float32

    def swap(module: torch.nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=compute, quant_type="nf4", compress_statistics=True)
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data.to(compute), requires_grad=False)
                setattr(module, name, quantized)
            else:
                swap(child)

    swap(unet)
    return unet.to(device)


def encode_live(text_encoders, tokenizers, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding with gradients (text-encoder LoRA).

    Args:
        text_encoders, tokenizers: both of SDXL's.
        prompts: the batch's captions.
        device: where the encoders are.

    Returns:
        ``(prompt_embeds, pooled)``: penultimate hidden states of both encoders side by side,
        and the second encoder's projection (the pooled embedding).
    """
    hidden = []
    for te, tok in zip(text_encoders, tokenizers):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds  # the second encoder's projection is the pooled embedding

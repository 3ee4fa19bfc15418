"""The check behind the memory planner: trace one UNet training step on fake tensors.

:mod:`lora_helpers.train.memory` estimates activations with coefficients; this module measures
them, on any CPU, by counting the bytes of live tensors while the UNet runs forward and
backward on fake tensors (nothing allocated, no weights needed). Tests and
``benchmarks/bench_train.py`` compare the two.

diffusers and peft are imported inside the function: they cost seconds to import and only
this measurement needs them here.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora_helpers.core.lora_files import UNET_TARGET_MODULES
from lora_helpers.train.block_memory import checkpointed_blocks
from lora_helpers.train.memory import GB
from lora_helpers.train.models import enable_block_checkpointing

__all__ = ["trace_training_memory"]


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created and still alive; remembers the peak."""

    def __init__(self, ignore: list[torch.Tensor]):
        super().__init__()
        self.current = self.peak = 0
        self.live = {id(t.untyped_storage()): 0 for t in ignore}  # weights and inputs are not counted

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.live:  # views share their base's storage
                    self.live[id(storage)] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def trace_training_memory(unet_config: dict, *, resolution: int = 1024, batch_size: int = 1, lora_rank: int = 16,
                          target_modules: tuple[str, ...] = UNET_TARGET_MODULES,
                          gradient_checkpointing: bool | str | int | list[str] = True, weight_dtype: str = "fp16",
                          backward: bool = True) -> dict[str, float]:
    """Trace one training step of the UNet on fake tensors and count the bytes of live tensors.

    Nothing is allocated and no weights are needed (the model lives on the ``meta`` device),
    so this measures, on any CPU, the tensors a GPU step would hold: the check behind the
    coefficients of :func:`lora_helpers.train.memory.estimate_peak_memory`. It takes seconds for the tiny model and
    about a minute for the full SDXL UNet. CUDA workspaces and allocator slack are not included.

    Args:
        unet_config: a UNet config (``lora_helpers.core.tiny_models.SDXL_UNET_CONFIG`` for SDXL).
        resolution, batch_size: the training step's image side in px and batch.
        lora_rank, target_modules: the LoRA (its gradients are counted).
        gradient_checkpointing: recompute activations in the backward pass: "all"/True, "none"/False, a
            number of blocks (:func:`lora_helpers.train.block_memory.checkpointed_blocks`) or block names.
        weight_dtype: "fp16" (with autocast) or "fp32".
        backward: also run the backward pass (False: the forward alone, for ``saved_gb``).

    Returns:
        ``{"peak_gb", "activations_gb", "lora_grads_gb", "saved_gb"}``: peak over forward and backward
        (excluding the weights themselves), and what is alive at the end of the forward pass (kept for backward).
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    dtype = torch.float32 if weight_dtype == "fp32" else torch.float16
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    blocks = (list(gradient_checkpointing) if isinstance(gradient_checkpointing, (list, tuple))
              else checkpointed_blocks(config, gradient_checkpointing, tuple(target_modules)))
    enable_block_checkpointing(unet, blocks)
    latent = resolution // 8
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    with FakeTensorMode():
        for module in unet.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=torch.float32 if p.requires_grad else dtype), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        sample = torch.randn(batch_size, 4, latent, latent, dtype=dtype)
        context = torch.randn(batch_size, 77, config["cross_attention_dim"], dtype=dtype)
        added = {"text_embeds": torch.randn(batch_size, text_dim, dtype=dtype),
                 "time_ids": torch.randn(batch_size, 6, dtype=dtype)}
        inputs = [sample, context, *added.values()]
        tracker = _LiveBytes(list(unet.parameters()) + list(unet.buffers()) + inputs)
        autocast = torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16)
        with tracker:
            with autocast:
                out = unet(sample, torch.full((batch_size,), 500), encoder_hidden_states=context,
                           added_cond_kwargs=added).sample
            loss = (out.float() ** 2).mean()
            saved = tracker.current
            if backward:
                loss.backward()
        grads = sum(p.numel() * 4 for p in unet.parameters() if p.requires_grad)
    return {"peak_gb": tracker.peak / GB, "activations_gb": max(tracker.peak - grads, 0) / GB, "lora_grads_gb": grads / GB,
            "saved_gb": saved / GB}

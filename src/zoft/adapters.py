"""Which parameters train: the whole model, or LoRA / prefix adapters through peft.

The ZO code never sees the difference: it only gets ``[p for p in model.parameters() if
p.requires_grad]``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from zoft.errors import ZoftError

MODES = ("full", "lora", "prefix")


def apply_mode(model, mode: str, *, is_masked_lm: bool = False, lora_r: int = 8, lora_alpha: int = 16,
               lora_targets: list[str] | None = None, num_virtual_tokens: int = 5):
    """Return the model to train, with ``requires_grad`` set on exactly the trained tensors."""
    if mode == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    task_type = None if is_masked_lm else TaskType.CAUSAL_LM
    if mode == "lora":
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                            target_modules=lora_targets, task_type=task_type)
    elif mode == "prefix":
        if is_masked_lm:
            raise ZoftError("prefix mode supports causal LMs only")
        config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type)
    else:
        raise ZoftError(f"unknown mode '{mode}'; choose from full, lora, prefix")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. no default LoRA targets for this architecture
        raise ZoftError(f"peft could not wrap the model for {mode}: {str(e).splitlines()[0]}; "
                        "set lora_targets=...") from None


def named_trainable(model) -> dict[str, torch.Tensor]:
    """Trained tensors by name, tied weights once, in ``named_parameters`` order."""
    seen, out = set(), {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def lora_changes(model) -> tuple[Callable[[], list[torch.Tensor]], float] | None:
    """LoRA's adapted matrices as the model sees them: a callable giving each one's change s·B·A
    (peft's ``get_delta_weight``, so fan-in/fan-out and scaling are peft's own) and the norm of the
    base weights W₀ they are added to. None if the model has no LoRA layer (or trains tensors
    outside them, whose own norm would be the scale): then the caller has no function-space scale."""
    from peft.tuners.lora import LoraLayer

    layers = [(m, name) for m in model.modules() if isinstance(m, LoraLayer)
              for name in m.active_adapters if name in m.lora_A]
    in_layers = {id(p) for m, name in layers for p in (*m.lora_A[name].parameters(), *m.lora_B[name].parameters())}
    if not layers or any(id(p) not in in_layers for p in named_trainable(model).values()):
        return None
    norm = math.sqrt(sum(float(m.get_base_layer().weight.detach().float().square().sum()) for m, _ in layers))
    return (lambda: [m.get_delta_weight(name) for m, name in layers]), norm

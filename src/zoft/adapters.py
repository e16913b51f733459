"""Which parameters train: the whole model, or LoRA / prefix adapters through peft.

The ZO code never sees the difference: it only gets ``[p for p in model.parameters() if
p.requires_grad]``.
"""
from __future__ import annotations

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

"""Models too big for one GPU: layers split across GPUs with accelerate's ``device_map``.

This is inference-style placement (accelerate's dispatch hooks move the activations between
devices); MeZO needs nothing more, because a step never moves a parameter: the torch backend
draws each tensor's z with a generator on that tensor's own device, into a scratch buffer kept
per device, and adds it there. Only the activations and the two scalar losses cross devices.
Note that z is drawn by each device's generator: a run's device placement is part of its
identity (replay it with the same placement for bitwise equality).
"""
from __future__ import annotations

import torch

from zoft.errors import ZoftError


def place(model: torch.nn.Module, device_map: str | dict, max_memory: dict | None = None) -> torch.nn.Module:
    """Spread ``model`` over devices: "auto"/"balanced" (accelerate decides, whole decoder layers
    per device) or an explicit ``{module name: device}`` map."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced"):
            raise ZoftError(f"device_map '{device_map}': use auto, balanced, or a mapping of module to device")
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map == "balanced" and torch.cuda.device_count() > 1:
            from accelerate.utils import get_balanced_memory
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=device_map)


def devices_of(params) -> list[torch.device]:
    """The distinct devices holding ``params``, in first-seen order."""
    return list(dict.fromkeys(p.device for p in params))

"""All trainable tensors as views of one flat buffer per (dtype, device).

``flatten_(params)`` copies every tensor into one contiguous buffer and rebinds its ``.data``
to the matching slice, so the model keeps its ``nn.Parameter`` objects (optimizers, peft,
``state_dict`` and ``load_state_dict`` see nothing new) while a perturbation pass over the
buffer is one kernel launch instead of one per tensor (≈270 for SmolLM2-135M).

The direction z drawn over a buffer is not the concatenation of the per-tensor z's (one
generator stream instead of one per tensor), so a flat run follows a different, equally
distributed, random path than a per-tensor run with the same seeds.

Memory: the torch backend draws z into a float32 scratch the size of what it perturbs, so a
flat pass needs 4 bytes per trained parameter of scratch (540 MB for SmolLM2-135M) where the
per-tensor pass needs the largest tensor's (113 MB, the embedding).

What breaks the tie: anything that rebinds ``.data`` or replaces the Parameter (e.g.
``model.to(other_dtype)``, ``load_state_dict(..., assign=True)``); in-place copies (``copy_``,
plain ``load_state_dict``) keep it. Flatten after peft has injected its adapters.
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def flatten_(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rebind each tensor's storage to a slice of one buffer per (dtype, device); return the buffers.

    The buffers are in first-seen order of (dtype, device); each tensor keeps its values and shape.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    buffers = []
    for (dtype, device), members in groups.items():
        existing = _existing_buffer(members)
        if existing is not None:   # already flat: rebinding again would move every weight
            buffers.append(existing)
            continue
        flat = torch.empty(sum(p.numel() for p in members), dtype=dtype, device=device)
        offset = 0
        for p in members:
            n = p.numel()
            flat[offset:offset + n].copy_(p.reshape(-1))
            p.data = flat[offset:offset + n].view(p.shape)
            offset += n
        buffers.append(flat)
    return buffers


def is_view_of(p: torch.Tensor, flat: torch.Tensor) -> bool:
    """True if ``p`` lives inside ``flat``'s memory (so writing the buffer writes the tensor)."""
    start, size = flat.data_ptr(), flat.numel() * flat.element_size()
    return (p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            and start <= p.data_ptr() < start + size)


def _existing_buffer(members: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The buffer ``members`` already are consecutive views of, covering all of it, else None."""
    storage = members[0].untyped_storage()
    offset = 0
    for p in members:
        if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset
                or not p.is_contiguous()):
            return None
        offset += p.numel()
    if offset * members[0].element_size() != storage.nbytes():
        return None
    return torch.empty(0, dtype=members[0].dtype, device=members[0].device).set_(storage, 0, (offset,))

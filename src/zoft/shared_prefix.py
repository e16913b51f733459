"""Shared-prefix scoring: a header many rows start with is run once, and each row attends to its keys and values.

Every ASAP prompt repeats its item's text and rubric (about 450 tokens) before a response of about
60, so most of an unshared forward re-reads the rubric. Here a batch's rows are grouped by header
(:attr:`zoft.tasks.Example.shared_prefix`, tokenised once per split); each group of two or more rows
runs its header once (batch 1, ``use_cache=True``), expands the resulting ``DynamicCache`` to the
group's size, and runs only the rows' own tokens on top of it, with an attention mask covering
header + row and position ids that continue the header's. A row then costs its own tokens, plus
attention over the header.

Exactness: the header's tokens are the first tokens of the unshared row (checked when encoding;
rows whose tokenisation does not split there, or whose context was truncated, are scored
unshared), so the shared path computes the same function; log-probs agree with the unshared
path to float rounding (tested within 1e-4 in fp32 on tiny-llama, full, LoRA and prefix modes,
and the FT gradients too: the header's keys and values stay in the autograd graph).

Weights change between the two forwards of a MeZO step, so nothing is cached across forwards
while training: the header runs once per forward pass over a batch (per ±εz evaluation). Where
the weights are frozen (evaluation, ``zoft score``, ``zoft serve``) :meth:`HeaderCache` keeps the
last few headers' keys and values, so a header runs once per item.

peft prefix tuning already feeds its virtual tokens as a cache: the header runs through the peft
model (virtual tokens + header), and the rows through the base model on top of that cache; the
rows' positions continue after the virtual tokens and the header, as an unpadded unshared row's do.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence


from zoft.errors import ZoftError

SHARED_PREFIX_MODES = ("auto", "on", "off")


def model_can_share(model, is_masked_lm: bool) -> str | None:
    """Why ``model`` cannot score with a shared prefix, or None if it can.

    Needs a causal LM whose forward takes ``position_ids`` and a cache (the rows are left-padded
    after the header, so their positions must be passed), with full attention in every layer (a
    sliding window would need the window's own cache layout).
    """
    if is_masked_lm:
        return "a masked LM reads the whole row both ways"
    base = getattr(model, "get_base_model", lambda: model)()
    if "position_ids" not in inspect.signature(base.forward).parameters or cache_argument(base) is None:
        return "its forward takes no position_ids or cache"
    config = getattr(base, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return "it has sliding-window attention layers"
    return None


def cache_argument(model) -> str | None:
    """The name a model's forward gives its KV cache: ``cache`` (transformers 5.x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def output_cache(out):
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def resolve_shared_prefix(mode: str, model, is_masked_lm: bool) -> bool:
    """Whether to share: ``on`` where it applies (refusing where it cannot), ``auto`` where it applies."""
    if mode not in SHARED_PREFIX_MODES:
        raise ZoftError(f"unknown shared_prefix '{mode}'; choose from {', '.join(SHARED_PREFIX_MODES)}")
    if mode == "off":
        return False
    reason = model_can_share(model, is_masked_lm)
    if reason is not None and mode == "on":
        raise ZoftError(f"shared_prefix=on cannot apply to this model: {reason}; use shared_prefix=auto or off")
    return reason is None


def header_spans(tokenizer, examples, context_ids: list[list[int]], truncated: list[bool]
                 ) -> tuple[list[int], list[int]]:
    """Per example: its header group (-1: none) and how many of its context tokens the header is.

    A header counts only where it ends at a token boundary of the unshared tokenisation (its own
    tokens are exactly the context's first tokens), leaves at least one context token after it,
    and the context was not truncated: then sharing changes nothing about the tokens scored.
    """
    tokenised: dict[str, list[int]] = {}
    group_of: dict[str, int] = {}
    groups, lengths = [], []
    for ex, ids, cut in zip(examples, context_ids, truncated):
        header = getattr(ex, "shared_prefix", "")
        if not header or cut or not ex.context.startswith(header):
            groups.append(-1)
            lengths.append(0)
            continue
        if header not in tokenised:
            tokenised[header] = tokenizer(header).input_ids
        head = tokenised[header]
        if len(ids) <= len(head) or ids[:len(head)] != head:
            groups.append(-1)
            lengths.append(0)
            continue
        groups.append(group_of.setdefault(header, len(group_of)))
        lengths.append(len(head))
    return groups, lengths


def shared_groups(groups: Sequence[int], min_rows: int = 2) -> tuple[list[list[int]], list[int]]:
    """Row positions grouped by header (groups of ``min_rows`` rows or more), and the rows left to run
    whole. A header shared by one row of a batch costs an extra forward, unless its cache is kept."""
    by_group: dict[int, list[int]] = {}
    for r, g in enumerate(groups):
        if g >= 0:
            by_group.setdefault(g, []).append(r)
    shared = [rows for rows in by_group.values() if len(rows) >= min_rows]
    in_shared = {r for rows in shared for r in rows}
    return shared, [r for r in range(len(groups)) if r not in in_shared]


def expand_cache(cache, n: int):
    """A ``DynamicCache`` of batch 1 as one of batch ``n``: expanded views, no copy until the rows'
    own keys are appended (a differentiable op: FT's gradients reach the header)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                        for k, v, *_ in cache])


class HeaderCache:
    """The keys and values of the last ``size`` headers, for frozen weights only (eval, score, serve).

    Keyed by the header's token ids; the caller must :meth:`clear` it (or not use it) once the
    weights change, as they do between the forwards of a training step.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: OrderedDict[tuple[int, ...], object] = OrderedDict()

    def get(self, key: tuple[int, ...]):
        cache = self._entries.get(key)
        if cache is not None:
            self._entries.move_to_end(key)
        return cache

    def put(self, key: tuple[int, ...], cache) -> None:
        self._entries[key] = cache
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

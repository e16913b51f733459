"""Scoring candidates with a language model: the one eval and loss path every method shares.

A task example is a context plus candidate continuations (label words for classification,
options for multiple choice, the gold answer for generation). Everything here works on
pre-tokenised examples (:class:`Encoded`, built once per split), so a training step only
pads integer lists, never calls the tokenizer.

Causal LMs score a continuation by the sum of its token log-probs given the context
(rows are left-padded, so the continuation always sits at the end of the row and only the
last few positions need logits). Single-token label words, or label words that share all but their
last token (moved into the context, :func:`common_label_tokens`), cost one row per example. Masked
LMs score single-token label words at a mask placed after the context, as in LM-BFF.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoft.errors import ZoftError
from zoft.shared_prefix import (HeaderCache, cache_argument, expand_cache, header_spans, output_cache,
                                resolve_shared_prefix, shared_groups)


COMPUTE_DTYPES = ("auto", "fp32", "bf16")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX): oneDNN then beats fp32;
    without them bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:   # an older torch without the probes: stay on fp32
        return False


def resolve_compute_dtype(name: str, model) -> str:
    """``compute_dtype`` with "auto" resolved for ``model``'s weights: bf16 for fp32 weights on a
    CPU with native bf16 (SmolLM2-135M forward 1.9x faster), else the weights' own dtype (on CUDA
    too: no speed-up measured there, so GPU runs keep their fp32 numerics)."""
    if name not in COMPUTE_DTYPES:
        raise ZoftError(f"unknown compute_dtype '{name}'; choose from {', '.join(COMPUTE_DTYPES)}")
    weights = next(model.parameters())
    if name != "auto":
        return name
    if weights.device.type == "cpu" and weights.dtype == torch.float32 and cpu_has_native_bf16():
        return "bf16"
    return _DTYPE_NAMES.get(weights.dtype, "fp32")


@dataclass
class Encoded:
    """A split, tokenised once.

    Attributes:
        context_ids: per example, the context's token ids (left-truncated to fit).
        choice_ids: per example, per candidate, the continuation's token ids.
        targets: (N,) gold candidate index per example.
        label_ids: (C,) the label words' token ids when every candidate is one shared
            token (classification fast path: one row per example instead of one per
            candidate), else None.
        mask_positions: masked LMs only, the index of the mask token in each context row.
        header_groups: per example, which shared header its context starts with (-1: none), when
            the scorer shares prefixes (:mod:`zoft.shared_prefix`), else None.
        header_lens: per example, that header's length in tokens (0: none).
    """

    context_ids: list[list[int]]
    choice_ids: list[list[list[int]]]
    targets: torch.Tensor
    label_ids: torch.Tensor | None = None
    mask_positions: list[int] | None = None
    header_groups: list[int] | None = None
    header_lens: list[int] | None = None

    def __len__(self) -> int:
        return len(self.context_ids)


class CandidateScorer:
    """Tokenises examples once and turns a model into candidate scores, losses and predictions.

    Args:
        model: a causal or masked LM (plain or wrapped by peft).
        tokenizer: its tokenizer.
        kind: the task kind: "classification", "multiple_choice" or "generation".
        is_masked_lm: score at a mask token instead of left to right.
        max_length: longest row in tokens; contexts are truncated from the left to fit.
        target_delimiter: text between context and continuation.
        compute_dtype: "fp32" (the weights' own dtype), "bf16" (matmuls under bf16 autocast,
            the weights stay as they are, so MeZO's ±εz and update stay exact in fp32) or
            "auto" (see :func:`resolve_compute_dtype`). Log-softmax and losses run in fp32.
        shared_prefix: "auto" (run each shared header once per batch where the model allows:
            a causal LM, see :mod:`zoft.shared_prefix`), "on" (the same, refused where it
            cannot apply) or "off" (every row read whole).
    """

    def __init__(self, model, tokenizer, kind: str, is_masked_lm: bool = False,
                 max_length: int = 256, target_delimiter: str = " ", compute_dtype: str = "fp32",
                 shared_prefix: str = "auto"):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.compute_dtype = resolve_compute_dtype(compute_dtype, model)
        # autocast only where it changes something: bf16 compute over fp32 weights
        self._autocast = self.compute_dtype == "bf16" and next(model.parameters()).dtype == torch.float32
        self.is_masked_lm, self.max_length, self.delimiter = is_masked_lm, max_length, target_delimiter
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # peft's prompt-learning wrappers prepend virtual tokens and build their own positions.
        peft_config = getattr(model, "active_peft_config", None)
        prompt_learning = bool(getattr(peft_config, "is_prompt_learning", False))
        forward = getattr(model, "get_base_model", lambda: model)().forward
        self._pass_positions = (not prompt_learning and not is_masked_lm
                                and "position_ids" in inspect.signature(forward).parameters)
        self._can_keep_logits = "logits_to_keep" in inspect.signature(forward).parameters
        self._prompt_learning = prompt_learning
        self.shares_prefix = resolve_shared_prefix(shared_prefix, model, is_masked_lm)
        self._cache_argument = cache_argument(getattr(model, "get_base_model", lambda: model)())
        self._header_cache: HeaderCache | None = None   # only inside frozen_weights()

    # ---------------------------------------------------------------- encoding
    def encode(self, examples) -> Encoded:
        """Tokenise a list of :class:`zoft.tasks.Example` once."""
        tok = self.tokenizer
        choice_texts = [ex.choices if self.kind != "generation" else ex.answers[:1] for ex in examples]
        choice_ids = [[tok(self.delimiter + c, add_special_tokens=False).input_ids for c in cs]
                      for cs in choice_texts]
        targets = torch.tensor([ex.target if ex.target is not None else 0 for ex in examples])
        if self.is_masked_lm:
            return self._encode_masked(examples, choice_ids, targets)
        # Label words that differ only in their last token (SmolLM2 reads " 0" as " " + "0") have their
        # common tokens moved to the end of the context: each row then runs once, not once per label.
        common = common_label_tokens(choice_ids) if self.kind == "classification" else []
        if common:
            choice_ids = [[c[len(common):] for c in cands] for cands in choice_ids]
        context_ids, truncated = [], []
        for ex, cands in zip(examples, choice_ids):
            ids = tok(ex.context).input_ids
            room = self.max_length - len(common) - max((len(c) for c in cands), default=0)
            kept = ids[-room:] if room > 0 else ids[-1:]
            context_ids.append(kept + common)
            truncated.append(len(kept) < len(ids))
        label_ids = None
        if self.kind == "classification" and all(len(c) == 1 for cs in choice_ids for c in cs):
            label_ids = torch.tensor([c[0] for c in choice_ids[0]])
        groups = lens = None
        if self.shares_prefix:
            groups, lens = header_spans(tok, examples, context_ids, truncated)
        return Encoded(context_ids, choice_ids, targets, label_ids, header_groups=groups, header_lens=lens)

    def _encode_masked(self, examples, choice_ids, targets) -> Encoded:
        tok = self.tokenizer
        if self.kind != "classification":
            raise ZoftError(f"masked LMs score single-token label words only; task kind '{self.kind}' needs a causal LM")
        if tok.mask_token is None:
            raise ZoftError("the masked LM's tokenizer has no mask token")
        for ex, cands in zip(examples, choice_ids):
            for word, ids in zip(ex.choices, cands):
                if len(ids) != 1:
                    raise ZoftError(f"{ex.ref}: label word '{word}' is {len(ids)} tokens; a masked LM needs one")
        context_ids, mask_positions = [], []
        for ex in examples:
            ids = tok(ex.context + self.delimiter + tok.mask_token).input_ids
            if len(ids) > self.max_length:  # keep the tail, where the mask is
                ids = ids[:1] + ids[len(ids) - self.max_length + 1:]
            context_ids.append(ids)
            mask_positions.append(ids.index(tok.mask_token_id))
        label_ids = torch.tensor([c[0] for c in choice_ids[0]])
        return Encoded(context_ids, choice_ids, targets, label_ids, mask_positions)

    # ---------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def compute(self):
        """Context the model's forwards run in: bf16 autocast for compute_dtype=bf16 over fp32
        weights (entered per forward, so autocast's cache of bf16 weight copies never outlives
        an in-place perturbation), else nothing."""
        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _forward(self, ids, mask, keep: int | None = None, **kwargs):
        if self._pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if keep is not None and self._can_keep_logits:
            kwargs["logits_to_keep"] = keep
        kwargs.setdefault("use_cache", False)   # scoring never decodes on; offload's dual forward needs no cache
        with self.compute():
            out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
        return out if keep is None else (out, out.logits[:, -keep:])

    @contextlib.contextmanager
    def frozen_weights(self):
        """Inside, the weights do not change: each shared header's keys and values are kept
        (the last few) and reused across batches, so a header runs once per item. Never
        around a training step, whose forwards see different weights."""
        self._header_cache = HeaderCache()
        try:
            yield self
        finally:
            self._header_cache = None

    def _shared_forward(self, header: list[int], tails: list[list[int]], keep: int, hidden: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, keep) last ids and (G, keep, V) logits of ``header + tail`` for each tail, the header run once
        (``hidden``: the last layer's (G, keep, H) hidden states instead of logits)."""
        device, key = self.device, tuple(header)
        cache = self._header_cache.get(key) if self._header_cache is not None else None
        if cache is None:
            head = torch.tensor([header], device=device)
            kwargs = {"logits_to_keep": 1} if self._can_keep_logits else {}
            if not self._prompt_learning:   # peft's prefix tuning places the header after its virtual tokens
                kwargs["position_ids"] = torch.arange(len(header), device=device)[None]
            with self.compute():
                cache = output_cache(self.model(input_ids=head, attention_mask=torch.ones_like(head), use_cache=True,
                                                **kwargs))
            if self._header_cache is not None:
                self._header_cache.put(key, cache)
        ids, mask = self._pad(tails, left=True)                       # (G, S): pads sit between header and tail
        past = cache.get_seq_length()                                 # prefix tuning's virtual tokens + header
        kwargs = {"logits_to_keep": keep} if self._can_keep_logits else {}
        # the rows go to the base model under prefix tuning: peft would replace the cache with its own
        forward = self.model.get_base_model() if self._prompt_learning else self.model
        kwargs[self._cache_argument] = expand_cache(cache, len(tails))
        with self.compute():
            out = forward(input_ids=ids, attention_mask=torch.cat([mask.new_ones(len(tails), past), mask], dim=1),
                          position_ids=past + (mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                          output_hidden_states=hidden, **kwargs)
        return ids[:, -keep:], (out.hidden_states[-1] if hidden else out.logits)[:, -keep:]

    def _tail_outputs(self, rows: list[list[int]], keep: int, groups: list[int] | None = None,
                     header_lens: list[int] | None = None, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, keep) left-padded last ids of each row and (R, keep, V) their logits (``hidden``: the
        last layer's (R, keep, H) hidden states, what the LM head reads).

        Rows with a header ``groups`` shares with another row run on that header's cache; the rest
        run whole, in one padded batch. Rows come back in their given order.
        """
        if groups is None:
            shared, whole = [], list(range(len(rows)))
        else:   # with frozen weights a header's cache outlives the batch: even one row is worth it
            shared, whole = shared_groups(groups, min_rows=1 if self._header_cache is not None else 2)
        parts, order = [], []
        if whole:
            ids, mask = self._pad([rows[r] for r in whole], left=True)
            out, logits = self._forward(ids, mask, keep=keep, output_hidden_states=hidden)
            parts.append((ids[:, -keep:], out.hidden_states[-1][:, -keep:] if hidden else logits))
            order += whole
        for members in shared:
            n = header_lens[members[0]]
            parts.append(self._shared_forward(rows[members[0]][:n], [rows[r][n:] for r in members], keep, hidden))
            order += members
        if len(parts) == 1 and order == sorted(order):
            return parts[0]
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))          # back[row] = its place in the parts
        back = back.to(self.device)
        return torch.cat([p[0] for p in parts])[back], torch.cat([p[1] for p in parts])[back]

    def _groups(self, enc: Encoded, idx: list[int], share: bool) -> tuple[list[int] | None, list[int] | None]:
        if not share or enc.header_groups is None:
            return None, None
        return [enc.header_groups[i] for i in idx], [enc.header_lens[i] for i in idx]

    def _label_logprobs(self, enc: Encoded, idx: list[int], share: bool = True) -> torch.Tensor:
        """(B, C) log-probs of the single-token label words at the scoring position."""
        rows = [enc.context_ids[i] for i in idx]
        if self.is_masked_lm:
            ids, mask = self._pad(rows, left=False)
            with self.compute():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            pos = torch.tensor([enc.mask_positions[i] for i in idx], device=ids.device)
            logits = logits[torch.arange(len(idx), device=ids.device), pos]
        else:
            logits = self._tail_outputs(rows, 1, *self._groups(enc, idx, share))[1][:, -1]
        return _upcast(logits).log_softmax(-1)[:, enc.label_ids.to(logits.device)]

    def _continuation_logprobs(self, rows: list[list[int]], cont_lens: list[int], groups: list[int] | None = None,
                               header_lens: list[int] | None = None) -> torch.Tensor:
        """(R,) summed log-prob of the last ``cont_lens[r]`` tokens of each row."""
        k = max(cont_lens)
        ids, logits = self._tail_outputs(rows, k + 1, groups, header_lens)
        logits = _upcast(logits[:, :-1])                                   # (R, k, V): predicts the last k tokens
        logprobs = logits.log_softmax(-1).gather(-1, ids[:, -k:, None]).squeeze(-1)
        in_cont = torch.arange(k, device=ids.device)[None, :] >= (k - torch.tensor(cont_lens, device=ids.device))[:, None]
        return (logprobs * in_cont).sum(-1)

    def candidate_logprobs(self, enc: Encoded, idx: list[int], only_target: bool = False, share: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of candidates for examples ``idx``.

        ``share=False`` reads every row whole even where the scorer shares prefixes (one forward
        over the whole batch: offload's dual forward and LP-FT's head capture need that).

        Returns:
            (scores, lengths): summed log-probs and token counts, both (B, C); with
            ``only_target`` both are (B, 1) for the gold candidate only (teacher forcing).
        """
        if enc.label_ids is not None and not only_target:
            scores = self._label_logprobs(enc, idx, share)
            return scores, torch.ones_like(scores)
        rows, lens, shape, row_of = [], [], [], []
        for i in idx:
            cands = [enc.choice_ids[i][int(enc.targets[i])]] if only_target else enc.choice_ids[i]
            shape.append(len(cands))
            rows += [enc.context_ids[i] + c for c in cands]
            lens += [len(c) for c in cands]
            row_of += [i] * len(cands)
        if len(set(shape)) != 1:
            raise ZoftError("examples in one batch have different numbers of options")
        scores = self._continuation_logprobs(rows, lens, *self._groups(enc, row_of, share)).view(len(idx), shape[0])
        lengths = torch.tensor(lens, device=scores.device, dtype=scores.dtype).view_as(scores)
        return scores, lengths

    # ---------------------------------------------------------------- objectives
    def loss(self, enc: Encoded, idx: list[int]) -> torch.Tensor:
        """The paper's training objective on examples ``idx``.

        Classification: cross-entropy over the candidates' log-likelihoods.
        Multiple choice and generation: teacher forcing on the gold continuation's tokens
        (mean negative log-likelihood per token).
        """
        targets = enc.targets[idx].to(self.device)
        if self.kind == "classification":
            scores, _ = self.candidate_logprobs(enc, idx)
            return F.cross_entropy(scores, targets)
        scores, lengths = self.candidate_logprobs(enc, idx, only_target=True)
        return -(scores / lengths).mean()

    def loss_pair(self, enc: Encoded, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`loss` of the two halves of one forward over ``idx`` stacked on itself: for a
        model whose layers use different weights for each half (offload's dual forward)."""
        targets, n = enc.targets[idx].to(self.device), len(idx)
        if self.kind == "classification":
            scores, _ = self.candidate_logprobs(enc, idx + idx, share=False)
            return F.cross_entropy(scores[:n], targets), F.cross_entropy(scores[n:], targets)
        scores, lengths = self.candidate_logprobs(enc, idx + idx, only_target=True, share=False)
        per_token = scores / lengths
        return -per_token[:n].mean(), -per_token[n:].mean()

    @torch.no_grad()
    def predict(self, enc: Encoded, idx: list[int]) -> list[int]:
        """Best candidate per example: summed log-prob for label words, per-token mean for options."""
        scores, lengths = self.candidate_logprobs(enc, idx)
        if self.kind != "classification":
            scores = scores / lengths
        return scores.argmax(-1).tolist()

    @torch.no_grad()
    def generate(self, enc: Encoded, idx: list[int], max_new_tokens: int = 32,
                 until: tuple[str, ...] = ("\n",)) -> list[str]:
        """Greedy decoding from each context, cut at the first stop string."""
        if self.is_masked_lm:
            raise ZoftError("generation needs a causal LM")
        ids, mask = self._pad([enc.context_ids[i] for i in idx], left=True)
        with self.compute():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.pad_id)
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        texts = [t.lstrip() for t in texts]   # a leading newline is formatting, not a stop
        for stop in until:
            texts = [t.split(stop)[0] if stop else t for t in texts]
        return [t.strip() for t in texts]

    @torch.no_grad()
    def features(self, enc: Encoded, idx: list[int]) -> torch.Tensor:
        """(B, H) last-layer hidden state where the label is predicted: features for linear probing.
        A causal LM reads rows on their shared header (:mod:`zoft.shared_prefix`) as scoring does."""
        rows = [enc.context_ids[i] for i in idx]
        if not self.is_masked_lm:
            return _upcast(self._tail_outputs(rows, 1, *self._groups(enc, idx, True), hidden=True)[1][:, -1])
        ids, mask = self._pad(rows, left=False)
        hidden = self._forward(ids, mask, output_hidden_states=True).hidden_states[-1]
        pos = torch.tensor([enc.mask_positions[i] for i in idx], device=hidden.device)
        return _upcast(hidden[torch.arange(len(idx), device=hidden.device), pos])


def common_label_tokens(choice_ids: list[list[list[int]]]) -> list[int]:
    """The tokens every label word starts with, where after them each label is one distinct token, else [].

    Classification normalises over the labels, so log P(common | context) is the same for every
    label and cancels: scoring the last token after ``context + common`` gives the same
    probabilities (and cross-entropy) as scoring each whole label, in one row per example instead
    of one per label. Needs the same label words, tokenised the same way, in every example.
    """
    labels = choice_ids[0] if choice_ids else []
    if len(labels) < 2 or any(cands != labels for cands in choice_ids):
        return []
    common = labels[0][:-1]
    if not common or any(len(c) != len(common) + 1 or c[:-1] != common for c in labels):
        return []
    return common if len({c[-1] for c in labels}) == len(labels) else []


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (bf16/fp16 logits lose the small differences that matter)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def batches(n: int, batch_size: int):
    """Consecutive index lists covering range(n)."""
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))

"""The training loss as a fixed-shape function, optionally compiled (CUDA graphs on a GPU).

A small model's forward is launch-bound: SmolLM2-135M at B=16, T=64 spends most of its eager
time launching ~1000 small kernels. :class:`FixedShapeLoss` makes every step the same shapes:
the training split is tokenised once, left-padded to one width T and kept on the device as
(N, T) tensors, and a step gathers B rows of them. That lets ``torch.compile`` capture the
forward once (``mode="reduce-overhead"`` replays it as a CUDA graph) and reuse it every step.
``compile="cuda-graph"`` skips the compiler: it captures the eager forward as a CUDA graph
(``torch.cuda.CUDAGraph``, one per batch size, into static input buffers) in the time of a few
forwards, where inductor takes minutes on a 30-layer model. A graph reads the weights by
address, so in-place perturbations are seen, but nothing may rebind a parameter after capture
(``flat_params`` flattens before the first loss call; offload, which streams layers to new
addresses, is refused by the config). Compilation or capture failures fall back to eager with a
one-line warning, never a crash.

The forward runs in the scorer's compute dtype (:meth:`CandidateScorer.compute`), as the
eager path does. Only classification with single-token label words (the scorer's fast path) is supported; the
loss is the scorer's: cross-entropy over the label words' log-probs at the last position.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from zoft.errors import ZoftError
from zoft.lm import CandidateScorer, Encoded


class FixedShapeLoss:
    """``loss(idx) -> float`` on pre-tokenised, fixed-width batches, eager or compiled.

    Args:
        scorer: the run's scorer (its model, pad id and position handling are reused).
        enc: the encoded training split (``label_ids`` must be set).
        width: the row width T; defaults to the longest row of the split.
        compile: "off", "default", "reduce-overhead" (inductor + CUDA graphs; on CPU it means
            "default") or "cuda-graph" (the eager forward captured as a CUDA graph; eager on CPU).
    """

    def __init__(self, scorer: CandidateScorer, enc: Encoded, width: int | None = None, compile: str = "off"):
        if enc.label_ids is None or scorer.is_masked_lm:
            raise ZoftError("compiled/fixed-shape loss supports causal-LM classification with "
                            "single-token label words only; set compile=off")
        self.scorer, self.device = scorer, scorer.device
        width = width or max(len(r) for r in enc.context_ids)
        rows = [r[-width:] for r in enc.context_ids]
        ids, mask = scorer._pad(rows, left=True)                 # (N, w), left-padded
        pad = width - ids.shape[1]
        self.ids = F.pad(ids, (pad, 0), value=scorer.pad_id)     # (N, T)
        self.mask = F.pad(mask, (pad, 0), value=0)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.targets = enc.targets.to(self.device)
        self.label_ids = enc.label_ids.to(self.device)
        self._fn: Callable = self._loss
        self.compiled = False
        self._graphs: dict[int, tuple] = {}   # batch size -> (graph, static inputs, static outputs)
        if compile == "cuda-graph":
            if self.device.type == "cuda":
                self._fn, self.compiled = self._graphed, True
            else:
                warnings.warn("compile=cuda-graph needs a CUDA device; running eager")
        elif compile != "off":
            self._fn = self._compile(compile)

    def _loss(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, scores): cross-entropy over the label words' log-probs, and those (B, C) log-probs."""
        kwargs = {"position_ids": positions} if self.scorer._pass_positions else {}
        if self.scorer._can_keep_logits:
            kwargs["logits_to_keep"] = 1
        with self.scorer.compute():   # the run's compute_dtype (bf16 autocast traces into the graph)
            logits = self.scorer.model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
        scores = logits.float().log_softmax(-1)[:, self.label_ids]     # (B, C)
        return F.cross_entropy(scores, targets), scores

    def _compile(self, mode: str) -> Callable:
        if mode == "reduce-overhead" and self.device.type != "cuda":
            mode = "default"   # CUDA graphs need CUDA; inductor still fuses on CPU
        try:
            fn = torch.compile(self._loss, mode=mode, dynamic=False)
            self.compiled = True
            return fn
        except Exception as e:   # noqa: BLE001 - any backend failure means: run eagerly
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); running eager")
            return self._loss

    def _graphed(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay this batch size's graph on ``batch`` (captured on first use). The outputs are
        the graph's own buffers: read them before the next call."""
        entry = self._graphs.get(batch[0].shape[0])
        if entry is None:
            entry = self._graphs[batch[0].shape[0]] = self._capture(batch)
        graph, inputs, outputs = entry
        for static, x in zip(inputs, batch):
            static.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, batch: tuple[torch.Tensor, ...]) -> tuple:
        inputs = [x.clone() for x in batch]
        side = torch.cuda.Stream(self.device)   # warm-up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):                  # lazy initialisation (cuBLAS handles, caches) happens here
                self._loss(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._loss(*inputs)
        return graph, inputs, outputs

    def _batch(self, idx) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(idx, device=self.device)
        return self.ids[index], self.mask[index], self.positions[index], self.targets[index]

    def _run(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(idx)
        try:
            return self._fn(*batch)
        except Exception as e:   # noqa: BLE001 - compilation happens lazily on the first call
            if self._fn is self._loss:
                raise
            warnings.warn(f"compiled loss failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "falling back to eager")
            self._fn, self.compiled = self._loss, False
            return self._loss(*batch)

    @torch.no_grad()
    def __call__(self, idx) -> float:
        """The batch loss (what a ZO estimator calls)."""
        return float(self._run(idx)[0])

    @torch.no_grad()
    def predict(self, idx) -> list[int]:
        """Predicted label index per example, from the same (compiled) forward."""
        return self._run(idx)[1].argmax(-1).tolist()

    def loss_tensor(self, idx) -> torch.Tensor:
        """The batch loss with autograd, eager (for a backprop baseline on the same objective)."""
        return self._loss(*self._batch(idx))[0]

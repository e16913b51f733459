"""CPU offload for MeZO, in the manner of ZO2: decoder blocks live in (pinned) CPU memory and
are streamed to the GPU one at a time, on a side CUDA stream that overlaps the copy of block
i+1 with the compute of block i. Only the embeddings, the head, the final norm and one or two
blocks are ever on the GPU.

Perturbation happens while a block is on the GPU. The estimator and optimizer still call
``backend.add_noise_(params, seed, scale, ...)`` as in a normal step; :class:`OffloadBackend`
applies it at once to the resident tensors and *queues* it for the offloaded blocks. When a
block arrives on the GPU (a forward pre-hook), its queued passes run there, in order, before it
computes; when it leaves (a forward hook), it is copied back to CPU memory. Each tensor thus
sees exactly the passes of the normal step, in the same order, on the same device type, so an
offloaded run gives bitwise the weights of a resident run on that device (and its trajectory
replays without offload). The restore and update of step t are applied when the block is next
uploaded, in step t+1's first forward (ZO2's deferred update).

**Dual forward: one stream of the weights per step.** The L+ and L− forwards need every block
twice, and two separate forwards would stream each block twice. Like ZO2, zoft runs both in one
forward over the batch stacked on itself (2B rows), with every block computing its halves in
turn while it is on the GPU:

    block arrives → queued passes (last step's update) → +εz → rows 0..B-1 → −2εz → rows B..2B-1
                  → restore → back to CPU memory

The model code is unchanged (any Hugging Face decoder): each block's ``forward`` and each
resident module with weights (embeddings, final norm, head) is wrapped to split its batch
arguments in halves and concatenate its outputs, so every module computes on B rows, as in the
resident step. Resident trained tensors (which tied embeddings may use at both ends of the
model) hold θ+εz for the first half and a copy holding θ−εz serves the second: one extra copy
of the resident trained weights, made by the same passes as the resident step. Activations are
those of a 2B batch. It is used when the objective offers ``loss_fn.pair()`` (zoft's LM loss
does) and the model passes no KV cache into its layers (not with prefix tuning); otherwise the
two forwards stream separately.

``settle()`` runs every queued pass, so anything that reads the weights directly (checkpoints,
replay output) must call it first; a forward pass settles by itself.

On a CPU "device" the transfers are plain copies: the same code path, testable without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from zoft.errors import ZoftError


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers: the ModuleList holding the most parameters (Llama, OPT, GPT-2, Qwen, ...)."""
    best, size = None, 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    if best is None:
        raise ZoftError("offload: found no list of decoder layers to stream in this model")
    return best


@dataclass
class _Pass:
    """One queued ``add_noise_`` call."""

    seed: int
    scale: float
    distribution: str
    undo: float


@dataclass
class _Dual:
    """A dual forward in progress: the three passes of one two-sided probe."""

    plus: _Pass
    minus: _Pass
    restore: _Pass
    start: int                         # absolute index of ``plus`` in the pass log
    minus_copies: dict[int, torch.Tensor] = field(default_factory=dict)   # id(resident param) -> θ−εz


class Offloader:
    """Keeps ``model``'s decoder blocks in CPU memory and streams them to ``device`` for compute.

    Args:
        model: the model (trained or not); its blocks move to CPU memory, the rest to ``device``.
        device: where compute runs.
        blocks: the streamed modules (default: :func:`find_blocks`).
        dual: run L+ and L− in one forward (one stream per step) where possible.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device,
                 blocks: Sequence[torch.nn.Module] | None = None, dual: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = list(blocks if blocks is not None else find_blocks(model))
        self.block_params = [list(dict.fromkeys(b.parameters())) for b in self.blocks]
        in_blocks = {id(p) for params in self.block_params for p in params}
        with torch.no_grad():
            for p in model.parameters():         # the rest (embeddings, head, norms) stays resident
                if id(p) not in in_blocks:
                    p.data = p.data.to(self.device)
            for block in self.blocks:
                for m in block.modules():
                    for k, buf in m._buffers.items():
                        if buf is not None:
                            m._buffers[k] = buf.to(self.device)
                for p in dict.fromkeys(block.parameters()):
                    host = p.data.to("cpu")
                    p.data = host.pin_memory() if self.cuda else host
        self.host = {id(p): p.data for params in self.block_params for p in params}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # The pass log: every add_noise_ since the oldest one some block has not applied yet.
        # Indices are absolute (log[0] is pass number ``first``), so trimming never renumbers.
        self.log: list[_Pass] = []
        self.first = 0
        self.applied = [0] * len(self.blocks)  # block i has applied passes [0, applied[i])
        self.prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.resident: set[int] = set()
        self.dirty: set[int] = set()           # blocks changed on the device since they arrived
        self.trained: list[torch.Tensor] = []   # the backend's parameter list (index i seeds z's block i)
        self.views: dict[int, list[torch.Tensor] | None] = {}
        self.inner = None
        self.uploads = 0                        # block transfers to the device (tests and benchmarks)
        self.dual: _Dual | None = None
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: self._enter(i))
            block.register_forward_hook(lambda m, args, out, i=i: self._leave(i))
            block.forward = self._block_forward(i, block.forward)
        self.halves = self._wrap_resident_modules(in_blocks) if dual else False

    # -- perturbation
    def backend(self, inner, params: Sequence[torch.Tensor]) -> "OffloadBackend":
        """Wrap a perturbation backend so that it reaches the offloaded tensors of ``params``."""
        self.inner, self.trained, self.views = inner, list(params), {}
        return OffloadBackend(self)

    def _check(self, params: Sequence[torch.Tensor]) -> None:
        if [id(p) for p in params] != [id(p) for p in self.trained]:
            raise ZoftError("offload: the backend was built for another parameter list")

    def _resident_view(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``params`` with the block tensors replaced by empty placeholders, which keep every
        tensor's index (the seed of its z) as in the full list."""
        return [_EMPTY if id(p) in self.host else p for p in params]

    def _block_view(self, b: int) -> list[torch.Tensor] | None:
        """The trained list with only block b's tensors in it (None if it has none)."""
        if b not in self.views:
            mine = {id(p) for p in self.block_params[b]}
            self.views[b] = ([p if id(p) in mine else _EMPTY for p in self.trained]
                             if any(id(p) in mine for p in self.trained) else None)
        return self.views[b]

    def _add(self, params: Sequence[torch.Tensor], op: _Pass) -> None:
        self._check(params)
        self._run(op, self._resident_view(params))   # resident tensors now
        self.log.append(op)                            # block tensors when their block is next on the device
        for b in self.resident:   # a block on the device right now takes the pass at once
            self._catch_up(b)

    def _run(self, op: _Pass, tensors: list[torch.Tensor]) -> None:
        self.inner.add_noise_(tensors, op.seed, op.scale, op.distribution, undo=op.undo)

    def _catch_up(self, b: int, upto: int | None = None) -> None:
        """Apply block b's queued passes (those numbered below ``upto``, default all), on the device."""
        upto = self.first + len(self.log) if upto is None else upto
        view = self._block_view(b)
        if view is not None and self.applied[b] < upto:
            for op in self.log[self.applied[b] - self.first:upto - self.first]:
                self._run(op, view)
            self.dirty.add(b)
        self.applied[b] = max(self.applied[b], upto)
        done = min(self.applied) - self.first
        if done > 0:   # every block has these: forget them
            del self.log[:done]
            self.first += done

    # -- dual forward
    def dual_probe(self, params: Sequence[torch.Tensor], pair_fn: Callable[[], tuple[float, float]],
                   seed: int, eps: float, distribution: str) -> tuple[float, float]:
        """One two-sided SPSA probe in one forward: ``pair_fn()`` runs the model once on the batch
        stacked on itself and returns the losses of its two halves, (L(θ+εz), L(θ−εz)).
        The passes are those of ``zo.estimator.spsa``, in the same order on every tensor."""
        self._check(params)
        plus, minus, restore = (_Pass(seed, +eps, distribution, 0.0), _Pass(seed, -eps, distribution, +eps),
                                _Pass(seed, 0.0, distribution, -eps))
        resident = self._resident_view(params)
        with torch.no_grad():
            self._run(plus, resident)                                  # θ+εz in place
            copies = [t if t is _EMPTY else t.clone() for t in resident]
            self._run(minus, copies)                                   # θ−εz in a copy
        start = self.first + len(self.log)
        self.log += [plus, minus, restore]
        self.dual = _Dual(plus, minus, restore, start,
                          {id(p): c for p, c in zip(resident, copies) if c is not _EMPTY})
        try:
            losses = pair_fn()
        finally:
            self.dual = None
        missed = [b for b in range(len(self.blocks)) if self.applied[b] < start + 3 and self._block_view(b)]
        if missed:
            raise ZoftError(f"offload: the dual forward skipped blocks {missed}; "
                            "the model must run every decoder layer once per forward")
        with torch.no_grad():
            self._run(restore, copies)                                 # θ, as the resident step leaves it
            for p, c in zip(resident, copies):
                if c is not _EMPTY:
                    p.copy_(c)
        return losses

    def _block_forward(self, b: int, forward: Callable) -> Callable:
        def dual_forward(*args, **kwargs):
            d = self.dual
            if d is None:
                return forward(*args, **kwargs)
            if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None:
                raise ZoftError("offload: the dual forward cannot split a KV cache (prefix tuning, use_cache=True)")
            first, second = _split(args, kwargs)
            view = self._block_view(b)
            if view is None:
                outs = (forward(*first[0], **first[1]), forward(*second[0], **second[1]))
            else:
                with torch.no_grad():
                    self._run(d.plus, view)
                out_plus = forward(*first[0], **first[1])
                with torch.no_grad():
                    self._run(d.minus, view)
                out_minus = forward(*second[0], **second[1])
                with torch.no_grad():
                    self._run(d.restore, view)
                self.dirty.add(b)
                outs = (out_plus, out_minus)
            self.applied[b] = d.start + 3
            return _concat(*outs)
        return dual_forward

    def _wrap_resident_modules(self, in_blocks: set[int]) -> bool:
        """Wrap each outermost resident module holding weights to compute the two halves apart
        (the second with the θ−εz copies). False when the model's layout does not allow it."""
        block_ids = {id(b) for b in self.blocks}
        wrapped: list[str] = []
        for name, module in self.model.named_modules():
            if id(module) in block_ids or any(w == "" or name.startswith(w + ".") for w in wrapped):
                continue   # a block (it splits itself), or inside a wrapped module
            own = [p for p in module.parameters(recurse=False) if id(p) not in in_blocks]
            if not own:
                continue
            if any(id(m) in block_ids for m in module.modules()):
                return False   # weights beside the blocks in their parent: cannot split it
            module.forward = self._resident_forward(module, module.forward)
            wrapped.append(name)
        return True

    def _resident_forward(self, module: torch.nn.Module, forward: Callable) -> Callable:
        def dual_forward(*args, **kwargs):
            d = self.dual
            if d is None:
                return forward(*args, **kwargs)
            first, second = _split(args, kwargs)
            out_plus = forward(*first[0], **first[1])
            swapped = [(p, p.data) for p in module.parameters() if id(p) in d.minus_copies]
            for p, _ in swapped:
                p.data = d.minus_copies[id(p)]
            try:
                out_minus = forward(*second[0], **second[1])
            finally:
                for p, plus in swapped:
                    p.data = plus
            return _concat(out_plus, out_minus)
        return dual_forward

    # -- streaming
    def _upload(self, b: int) -> tuple[list[torch.Tensor], object]:
        self.uploads += 1
        hosts = [self.host[id(p)] for p in self.block_params[b]]
        if not self.cuda:
            return [h.clone() for h in hosts], None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))   # host copies of a write-back done
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in hosts]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def _enter(self, b: int) -> None:
        copies, event = self.prefetched.pop(b, None) or self._upload(b)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for c in copies:
                c.record_stream(torch.cuda.current_stream(self.device))
        for p, c in zip(self.block_params[b], copies):
            p.data = c
        self.resident.add(b)
        # in a dual forward the probe's own passes run inside the block's forward, between its halves
        self._catch_up(b, upto=self.dual.start if self.dual is not None else None)
        nxt = (b + 1) % len(self.blocks)   # after the last block, the next forward's first
        if nxt not in self.prefetched and nxt not in self.resident:
            self.prefetched[nxt] = self._upload(nxt)   # overlaps with block b's compute

    def _leave(self, b: int) -> None:
        self.resident.discard(b)
        changed = b in self.dirty
        self.dirty.discard(b)
        if self.cuda and changed:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for p in self.block_params[b]:
                    self.host[id(p)].copy_(p.data, non_blocking=True)
                    p.data.record_stream(self.stream)   # keep the device copy alive until copied
        elif changed:
            for p in self.block_params[b]:
                self.host[id(p)].copy_(p.data)
        for p in self.block_params[b]:
            p.data = self.host[id(p)]

    @torch.no_grad()
    def settle(self) -> None:
        """Run every queued pass on every block (each visits the device once); then the CPU copies
        are the current weights."""
        end = self.first + len(self.log)
        for b in range(len(self.blocks)):
            if self.applied[b] < end:
                self._enter(b)
                self._leave(b)
        for copies, event in self.prefetched.values():
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        self.prefetched.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)


_EMPTY = torch.empty(0)


def _split(args: tuple, kwargs: dict):
    """The two halves of a module call on a stacked batch: every tensor argument of 2+ dims whose
    first dimension is the batch's (that of the first tensor argument) is cut in two; anything
    else (position tables of batch 1, cache positions, flags) goes to both halves unchanged."""
    lead = next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
    if lead is None or lead.shape[0] % 2:
        raise ZoftError("offload: the dual forward needs a batch argument with an even number of rows")
    rows = lead.shape[0]

    def cut(x, half: int):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == rows:
            return x[:rows // 2] if half == 0 else x[rows // 2:]
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v, half) for v in x)
        return x
    return tuple((tuple(cut(a, h) for a in args), {k: cut(v, h) for k, v in kwargs.items()}) for h in (0, 1))


def _concat(a, b):
    """A module's two half outputs as one: tensors concatenated on the batch dimension."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b]) if a.dim() else a
    if isinstance(a, (tuple, list)):
        return type(a)(_concat(x, y) for x, y in zip(a, b))
    return a


class OffloadBackend:
    """A perturbation backend over an :class:`Offloader`: same calls, passes deferred for offloaded blocks."""

    def __init__(self, offloader: Offloader):
        self.offloader = offloader
        self.name = offloader.inner.name
        # zo.estimator.spsa uses this, when the loss offers pair(), to run L+ and L− in one forward
        self.dual_probe = offloader.dual_probe if offloader.halves else None

    def add_noise_(self, params, seed, scale, distribution="gaussian", undo=0.0) -> None:
        self.offloader._add(params, _Pass(seed, scale, distribution, undo))

    def direction(self, param, seed, index, distribution="gaussian", out=None):
        return self.offloader.inner.direction(param, seed, index, distribution, out=out)

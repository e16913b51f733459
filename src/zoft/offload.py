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

Unlike ZO2, the + and − forward passes stream the blocks separately (twice the transfers of
ZO2's dual forward, which needs a per-architecture forward loop); any Hugging Face decoder
works unchanged. ``settle()`` runs every queued pass, so anything that reads the weights
directly (checkpoints, replay output) must call it first; a forward pass settles by itself.

On a CPU "device" the transfers are plain copies: the same code path, testable without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


class Offloader:
    """Keeps ``model``'s decoder blocks in CPU memory and streams them to ``device`` for compute."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device, blocks: Sequence[torch.nn.Module] | None = None):
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
        self.queue: list[_Pass] = []            # passes not yet applied to every block
        self.applied = [0] * len(self.blocks)  # how many queue entries block i has applied
        self.prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.resident: set[int] = set()
        self.dirty: set[int] = set()           # blocks changed on the device since they arrived
        self.index: dict[int, int] = {}         # id(param) -> index in the trained list (z's seed)
        self.trained: list[torch.Tensor] = []
        self.inner = None
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: self._enter(i))
            block.register_forward_hook(lambda m, args, out, i=i: self._leave(i))

    # -- perturbation
    def backend(self, inner, params: Sequence[torch.Tensor]) -> "OffloadBackend":
        """Wrap a perturbation backend so that it reaches the offloaded tensors of ``params``."""
        self.inner, self.trained = inner, list(params)
        self.index = {id(p): i for i, p in enumerate(params)}
        return OffloadBackend(self)

    def _add(self, params: Sequence[torch.Tensor], op: _Pass) -> None:
        if [id(p) for p in params] != [id(p) for p in self.trained]:
            raise ZoftError("offload: the backend was built for another parameter list")
        # resident tensors now; block tensors when their block is next on the device. The empty
        # placeholders keep every tensor's index (which seeds its z) as in the full list.
        queued = {i for params_b in self.block_params for i in (self.index.get(id(p)) for p in params_b)
                  if i is not None}
        self._run(op, [p if i not in queued else _EMPTY for i, p in enumerate(params)])
        self.queue.append(op)
        for b in self.resident:   # a block on the device right now takes the pass at once
            self._catch_up(b)

    def _run(self, op: _Pass, tensors: list[torch.Tensor]) -> None:
        self.inner.add_noise_(tensors, op.seed, op.scale, op.distribution, undo=op.undo)

    def _catch_up(self, b: int) -> None:
        """Apply block b's queued passes, on the device."""
        mine = {self.index[id(p)] for p in self.block_params[b] if id(p) in self.index}
        if mine and self.applied[b] < len(self.queue):
            view = [p if i in mine else _EMPTY for i, p in enumerate(self.trained)]
            for op in self.queue[self.applied[b]:]:
                self._run(op, view)
            self.dirty.add(b)
        self.applied[b] = len(self.queue)
        done = min(self.applied)
        if done:   # every block has these: forget them
            del self.queue[:done]
            self.applied = [a - done for a in self.applied]

    # -- streaming
    def _upload(self, b: int) -> tuple[list[torch.Tensor], object]:
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
        self._catch_up(b)
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
        for b in range(len(self.blocks)):
            if self.applied[b] < len(self.queue):
                self._enter(b)
                self._leave(b)
        for copies, event in self.prefetched.values():
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        self.prefetched.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)


_EMPTY = torch.empty(0)


class OffloadBackend:
    """A perturbation backend over an :class:`Offloader`: same calls, passes deferred for offloaded blocks."""

    def __init__(self, offloader: Offloader):
        self.offloader = offloader
        self.name = offloader.inner.name

    def add_noise_(self, params, seed, scale, distribution="gaussian", undo=0.0) -> None:
        self.offloader._add(params, _Pass(seed, scale, distribution, undo))

    def direction(self, param, seed, index, distribution="gaussian", out=None):
        return self.offloader.inner.direction(param, seed, index, distribution, out=out)

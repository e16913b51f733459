"""Backprop baselines: fine-tuning (FT) and linear-probe-then-fine-tune (LP-FT).

FT minimises the very objective MeZO does (:meth:`zoft.lm.CandidateScorer.loss`) with
AdamW and backprop, in full or LoRA mode, through the same loop, checkpoints and eval
path. Each step:

    lr ← schedule(step)                    stateless, so a resumed run sets the same LR
    L  ← loss(batch(seed, step))           model in train mode; dropout seeded by (seed, step)
    check L and ‖∇L‖ are finite            before the optimizer touches anything
    θ  ← AdamW(θ, ∇L, lr)                  weight decay on tensors with ≥ 2 dims only

The AdamW moments are saved in each checkpoint as a flat dict of tensors
(``state.{i}.exp_avg``, ``state.{i}.exp_avg_sq``, ``state.{i}.step``, with ``i`` the
tensor's index in :func:`zoft.adapters.named_trainable` order), so on CPU in fp32 a run
killed and resumed ends with weights bit-identical to an uninterrupted one.

LP-FT (Kumar et al., 2022) first fits the linear probe of :mod:`zoft.methods.linear_probe`
on the features the LM head sees, writes it into the head rows of the label words, then
fine-tunes from there. For a probe ``z = ((h − μ)/σ)·w + b`` the head gets rows ``w/σ``
and a bias ``b − μ·w/σ`` on those rows (a zero bias is added to heads without one), so
the model's candidate log-probs equal the probe's logits up to a per-example constant
(the log-partition over the vocabulary), and its predictions are the probe's. A binary
probe (one weight vector) becomes rows ``∓w/2``. Heads tied to the input embeddings are
untied first, so the input embeddings keep their pretrained values.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from safetensors.torch import load_file

from zoft.adapters import MODES, named_trainable
from zoft.errors import ZoftError
from zoft.lm import CandidateScorer, Encoded, batches
from zoft.methods.common import Setup, evaluate, finish, guard_reference, hf_export, load_trained_lm
from zoft.methods.linear_probe import (PROBE_HEAD_FILE, fit_probe, install_head, probe_to_head, require_classification,
                                       restore_probe_head, save_probe_head)
from zoft.methods.registry import Method, register_method
from zoft.guard import Guard
from zoft.training import Trainable, batch_indices, check_finite, train_loop
from zoft.zo import learning_rate



# ---------------------------------------------------------------- optimizer
def make_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float,
                   fused: bool = False) -> torch.optim.AdamW:
    """AdamW with two groups: decay on matrices (dim ≥ 2), none on biases and norm gains.

    ``fused`` (``adamw_fused``) takes torch's fused kernel, one pass over each group's tensors
    instead of a chain of per-op loops: on the 2-core CPU, 0.06 s against 0.17 s a step for
    Gemma-3-270M's 100M trained weights. Its rounding differs from the loop's (weights ~1e-9 apart
    after a step), so a run resumes bit-identically only under the setting it started with
    (config.yaml keeps it).
    """
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True if fused else None)


def optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer's per-tensor state as ``{"state.{i}.{name}": tensor}`` (safetensors, no pickle)."""
    flat = {}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            flat[f"state.{i}.{name}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                         flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state`: moments take each tensor's device and dtype, ``step`` stays as saved."""
    per_tensor: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    optimizer.state.clear()   # a rollback to the start restores no state at all
    for key, value in flat.items():
        prefix, index, name = key.split(".", 2)
        if prefix != "state" or not index.isdigit():
            raise ZoftError(f"optimizer checkpoint: unexpected key '{key}'")
        per_tensor[int(index)][name] = value
    for i, state in per_tensor.items():
        if i >= len(params):
            raise ZoftError(f"optimizer checkpoint has state for tensor {i} but only {len(params)} are trained; "
                            "was it written with another mode or model?")
        p = params[i]
        restored = {}
        for name, value in state.items():
            if name == "step":   # the fused kernel keeps its step count beside the weights
                fused = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
                restored[name] = value.to(p.device).clone() if fused else value.clone()
                continue
            if value.shape != p.shape:
                raise ZoftError(f"optimizer checkpoint: state.{i}.{name} has shape {tuple(value.shape)}, "
                                f"the tensor has {tuple(p.shape)}; was it written with another mode or model?")
            restored[name] = value.to(device=p.device, dtype=p.dtype).clone()
        optimizer.state[p] = restored


# ---------------------------------------------------------------- training
def step_rng_seed(seed: int, step: int) -> int:
    """Seed of the step's dropout masks: a pure function of (seed, step), like its batch."""
    return int(np.random.default_rng([seed, step, 0xD0]).integers(0, 2**62))


@contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Seed torch's RNG for a block and restore it after, so dropout replays exactly on resume."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def grad_norm(params: list[torch.Tensor]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def adamw_trainable(named: dict[str, torch.Tensor], optimizer, params: list[torch.Tensor]) -> Trainable:
    """The trained tensors plus the AdamW state, as checkpoints store them."""
    return Trainable(named, get_optimizer_state=lambda: optimizer_state(optimizer, params),
                     set_optimizer_state=lambda flat: load_optimizer_state(optimizer, params, flat))


def backward_in_micro_batches(loss_of: Callable[[list[int]], torch.Tensor], idx: list[int],
                              lengths: Sequence[int], micro_batch_size: int | None) -> float:
    """Backpropagate the mean loss of the batch ``idx`` and return it, in micro-batches of at most
    ``micro_batch_size`` examples of similar length (None: the batch in one piece).

    The batch is sorted by length and cut into consecutive runs, each padded only to its own
    longest example; their gradients, each weighted by its share of the batch, add up to the whole
    batch's (``loss_of`` is a mean over its examples). Same batch, same gradient up to float
    rounding, less padding: on ASAP set 10 (Gemma's tokens, batch 16) a random batch is 57% padding
    whole and 18% in four micro-batches. Peak activation memory falls with the micro-batch too.
    """
    if not micro_batch_size or micro_batch_size >= len(idx):
        loss = loss_of(idx)
        loss.backward()
        return loss.item()
    ordered = sorted(idx, key=lambda i: lengths[i])
    total = 0.0
    for start in range(0, len(ordered), micro_batch_size):
        chunk = ordered[start:start + micro_batch_size]
        loss = loss_of(chunk) * (len(chunk) / len(idx))
        loss.backward()
        total += loss.item()
    return total


def adamw_step(step: int, cfg, model, optimizer, params: list[torch.Tensor], backward_loss, device,
               frozen: list[torch.Tensor] = (), lr_scale: float = 1.0) -> dict:
    """One backprop step: stateless LR (× the guard's ``lr_scale``), seeded dropout, finite check,
    AdamW; ``frozen`` gets no update. ``backward_loss()`` backpropagates the step's loss and returns
    its value (:func:`backward_in_micro_batches`)."""
    lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps) * lr_scale
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with seeded_rng(step_rng_seed(cfg.seed, step), device):
        loss = backward_loss()
    for p in frozen:   # no gradient: AdamW skips the tensor entirely (no moment, no decay)
        p.grad = None
    norm = grad_norm(params)
    check_finite(step + 1, loss=loss, grad_norm=norm)   # before the step: weights stay good
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)   # free the gradients before dev eval
    return {"loss": loss, "grad_norm": norm, "lr": lr}


def train(setup: Setup, run_dir, model, resume: bool = False, head_only_steps: int = 0,
          head_params: list[torch.Tensor] | None = None, scorer=None, model_name: str | None = None) -> dict:
    """Fine-tune ``model`` (already in its mode) with AdamW through :func:`zoft.training.train_loop`.

    Args:
        head_only_steps: for the first this many steps only ``head_params`` are updated
            (the rest get no gradient, which AdamW skips entirely: no moment, no decay).
        scorer: what encodes, scores and takes the loss of examples (default: the LM's
            :class:`~zoft.lm.CandidateScorer`; bert-cls passes its encoder classifier).
        model_name: the model eval.json names (default: the config's).
    """
    cfg, task, data = setup.cfg, setup.task, setup.data
    scorer = scorer if scorer is not None else setup.scorer(model)
    enc_train, enc_dev = scorer.encode(data.train), scorer.encode(data.dev)
    named = named_trainable(model)
    params = list(named.values())
    if not params:
        raise ZoftError(f"mode '{cfg.mode}' leaves no tensor to train")
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, fused=cfg.adamw_fused)
    lengths = [len(ids) for ids in enc_train.context_ids]
    head_ids = {id(p) for p in head_params or []}
    body = [p for p in params if id(p) not in head_ids]

    def step_fn(step: int, lr_scale: float = 1.0) -> dict:
        idx = batch_indices(len(enc_train), cfg.batch_size, cfg.seed, step, lengths if cfg.group_by_length else None)
        frozen = body if step < head_only_steps else ()   # LP phase of LP-FT: the body gets no update
        return adamw_step(step, cfg, model, optimizer, params,
                          lambda: backward_in_micro_batches(lambda chunk: scorer.loss(enc_train, chunk), idx,
                                                            lengths, cfg.micro_batch_size),
                          scorer.device, frozen, lr_scale)

    def dev_fn() -> float:
        return evaluate(scorer, enc_dev, data.dev, task, cfg.eval_batch_size, cfg.progress,
                        decision=cfg.decision)[task.metric]

    @torch.no_grad()
    def reference_loss(idx: list[int]) -> float:   # the guard's reference, without dropout
        training = model.training
        model.eval()
        try:
            return scorer.loss(enc_train, idx).item()
        finally:
            model.train(training)

    trainable = adamw_trainable(named, optimizer, params)
    guard = Guard(cfg.guard_factor, cfg.guard_max_rollbacks) if cfg.guard else None
    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=step_fn, dev_fn=dev_fn, trainable=trainable, resume=resume,
                       progress=cfg.progress, metric_name=task.metric, report_to=cfg.report_to,
                       export=hf_export(model, scorer.tokenizer, setup.loaded),
                       guard=guard, reference=guard_reference(cfg, len(enc_train), reference_loss) if guard else None)
    model.eval()
    return finish(setup, run_dir, scorer, trainable, state, model_name)


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    """FT: backprop fine-tuning with AdamW on the MeZO objective (full or LoRA)."""
    return train(setup, run_dir, setup.with_mode(), resume)


# ---------------------------------------------------------------- LP-FT
@torch.no_grad()
def head_inputs(scorer: CandidateScorer, enc: Encoded, batch_size: int) -> np.ndarray:
    """(N, H) float64: what the output head receives at the scoring position.

    For causal LMs this is :meth:`CandidateScorer.features`; for masked LMs it is the
    hidden state after the MLM head's transform, the only vectors the head rows can
    reproduce a probe on.
    """
    head = scorer.model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    was_training = scorer.model.training
    scorer.model.eval()
    out = []
    try:
        for idx in batches(len(enc), batch_size):
            captured.clear()
            scorer.candidate_logprobs(enc, idx, share=False)   # the label-word path: one head call
            h = captured[-1]                        # (B, T', H)
            if scorer.is_masked_lm:
                pos = torch.tensor([enc.mask_positions[i] for i in idx], device=h.device)
                h = h[torch.arange(len(idx), device=h.device), pos]
            else:
                h = h[:, -1]                        # rows are left-padded: the last position scores
            out.append(h.float().cpu())
    finally:
        hook.remove()
        scorer.model.train(was_training)
    return torch.cat(out).double().numpy()


def install_probe(setup: Setup, run_dir, resume: bool = False, what: str = "LP-FT") -> float:
    """Fit the linear probe on the training features (forward passes only) and write it into the
    LM head's label-word rows (untied, with a bias); returns the probe's training accuracy.

    The probe head is kept in ``probe_head.safetensors``; a resumed run reuses it."""
    cfg, task, data = setup.cfg, setup.task, setup.data
    require_classification(task, what)
    model = setup.loaded.model
    model.eval()
    scorer = setup.scorer(model)
    enc_train = scorer.encode(data.train)
    if enc_train.label_ids is None:
        raise ZoftError(f"{what} writes the probe into the LM head rows of the label words, so each must be one "
                        f"token; task '{task.name}' has label words {task.label_words} that are not")
    path = run_dir.path / PROBE_HEAD_FILE
    if not (resume and path.is_file()):
        features = head_inputs(scorer, enc_train, cfg.eval_batch_size)
        labels = np.array([ex.target for ex in data.train])
        probe = fit_probe(features, labels, cfg.lp_c, cfg.seed)
        rows, bias = probe_to_head(probe, len(enc_train.label_ids))
        save_probe_head(path, {"rows": rows.float(), "bias": bias.float(), "label_ids": enc_train.label_ids,
                                "probe_train_acc": torch.tensor(float((probe.predict(features) == labels).mean()))})
    saved = load_file(str(path))
    install_head(model, saved["label_ids"], saved["rows"], saved["bias"])
    return float(saved["probe_train_acc"])


def run_lp_ft(setup: Setup, run_dir, resume: bool = False) -> dict:
    """LP-FT: fit the linear probe, write it into the LM head's label-word rows, then fine-tune.

    With ``cfg.lp_ft_probe_steps = N > 0`` the first N of the ``cfg.steps`` steps update the
    head only (the LP phase continues by gradient, body frozen) before everything trains.
    """
    probe_train_acc = install_probe(setup, run_dir, resume)
    model = setup.with_mode(setup.loaded.model)
    head = model.get_output_embeddings()
    head_params = [p for p in (head.weight, head.bias) if p.requires_grad]
    if setup.cfg.lp_ft_probe_steps > 0 and not head_params:
        raise ZoftError(f"lp_ft_probe_steps needs a trainable head; mode '{setup.cfg.mode}' freezes it (use mode=full)")
    result = train(setup, run_dir, model, resume, head_only_steps=setup.cfg.lp_ft_probe_steps, head_params=head_params)
    result["probe_train_acc"] = probe_train_acc
    run_dir.write_json("eval.json", result)
    return result


def load_lp_ft(setup: Setup, run_dir):
    """A finished LP-FT run: its probe head first (untied, with a bias), then its trained tensors."""
    restore_probe_head(setup.loaded.model, run_dir.path)
    return load_trained_lm(setup, run_dir)


register_method(Method("ft", run, load=load_trained_lm, modes=MODES, trains=True))
register_method(Method("lp-ft", run_lp_ft, load=load_lp_ft, modes=MODES, trains=True))

__all__ = ["run", "run_lp_ft", "install_probe", "train", "backward_in_micro_batches", "make_optimizer",
           "optimizer_state", "load_optimizer_state", "head_inputs", "probe_to_head", "install_head", "restore_probe_head"]

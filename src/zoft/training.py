"""The training loop shared by every trained method (MeZO, FT, LP-FT).

A method supplies ``step_fn(step) -> record``; this loop owns everything around it:
the progress bar, dev evaluation every N steps with the best weights kept, metrics.jsonl,
atomic checkpoints, resume and the divergence guard (:mod:`zoft.guard`: a NaN, a climbing loss or
blown-up weights roll the run back to its last good state with the lr halved).

Resume is exact because nothing here carries hidden RNG state: batches and MeZO
directions are pure functions of (seed, step), so a run restarted from checkpoint-N
replays steps N, N+1, ... exactly as the uninterrupted run did.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from zoft import faults
from zoft.errors import ZoftError
from zoft.atomic import WriteError
from zoft.guard import WEIGHT_CHECK_EVERY, Guard, GuardState
from zoft.runs import RunDir
from zoft.tracking import metric_writer

log = logging.getLogger(__name__)


class DivergedError(ZoftError):
    """Training diverged: a NaN or inf loss (stopped before applying the bad step), or, with the
    guard on, still diverging after its last rollback. ``reason`` is the cause without the step."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def check_finite(step: int, **values: float) -> None:
    """Raise DivergedError if a value is NaN or inf; ``step`` counts from 1, as metrics.jsonl does."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise DivergedError(f"step {step}: {name} is {value}; training stopped before applying this step",
                                reason=f"{name} is {value}")


def batch_indices(n: int, batch_size: int, seed: int, step: int, lengths: list[int] | None = None) -> list[int]:
    """The examples of ``step``: epoch-wise shuffling, as a pure function of (seed, step).

    With ``lengths`` (one per example: ``group_by_length``), each epoch's order is transformers'
    length-grouped one: a shuffle, cut into megabatches of up to 50 batches, each sorted by length, so a
    batch holds examples of similar length and pads little. Its generator is seeded by (seed, epoch).
    """
    if n <= batch_size:
        return list(range(n))
    steps_per_epoch = n // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    if lengths is None:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    else:
        from transformers.trainer_pt_utils import get_length_grouped_indices
        generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, 0x1E]).integers(0, 2**62)))
        order = np.asarray(get_length_grouped_indices(list(lengths), batch_size, generator=generator))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


@dataclass
class TrainState:
    """What a checkpoint stores beside the weights (trainer_state.json)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)
    guard: dict = field(default_factory=dict)   # zoft.guard.GuardState: the loss EMA, lr scale, rollbacks


# what HF's trainer_state.json has beside our fields; written for HF tools, recomputed on resume
HF_STATE_KEYS = ("global_step", "max_steps", "best_model_checkpoint", "log_history")


def log_history(records: list[dict], metric_name: str) -> list[dict]:
    """metrics.jsonl as HF's ``log_history``: a training entry per step, an ``eval_*`` entry per evaluation."""
    history = []
    for r in records:
        train = {"step": r["step"], **{("learning_rate" if k == "lr" else k): v for k, v in r.items()
                                       if k not in ("step", "dev")}}
        history.append(train)
        if r.get("dev") is not None:
            history.append({"step": r["step"], f"eval_{metric_name}": r["dev"]})
    return history


def hf_trainer_state(state: TrainState, run: RunDir, steps: int, metric_name: str) -> dict:
    """``state`` plus the fields of HF's trainer_state.json, so HF tools can read a checkpoint's history."""
    best = str(run.path / "best") if state.best_step is not None else None
    return {**state.__dict__, "global_step": state.step, "max_steps": steps, "best_model_checkpoint": best,
            "log_history": log_history(run.read_metrics(), metric_name)}


@dataclass
class Trainable:
    """The tensors a method trains, by name, plus optional optimizer state accessors."""

    tensors: dict[str, torch.Tensor]
    get_optimizer_state: Callable[[], dict[str, torch.Tensor]] | None = None
    set_optimizer_state: Callable[[dict[str, torch.Tensor]], None] | None = None
    # removes a perturbation a fused MeZO step leaves in the weights between steps (zo/fused.py)
    settle: Callable[[], None] = lambda: None

    def snapshot(self) -> dict[str, torch.Tensor]:
        self.settle()
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.tensors) - set(tensors), set(tensors) - set(self.tensors)
        if missing:
            raise ZoftError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. '{sorted(missing)[0]}'")
        if unexpected:
            raise ZoftError(f"checkpoint has {len(unexpected)} tensors this model does not train, "
                            f"e.g. '{sorted(unexpected)[0]}' (different mode or model?)")
        for k, v in self.tensors.items():
            v.copy_(tensors[k])


class LastGood:
    """Where a rollback returns to: the last checkpoint on disk, else an in-memory copy.

    With ``on_disk`` (weights are checkpointed) the copy exists only before the first checkpoint
    (the starting weights); otherwise (``save_weights=false``: checkpoints are trajectories) it is
    retaken at every checkpoint. The copy lives in CPU memory: the trained tensors plus the
    optimizer state, i.e. one more copy of the weights in full mode, next to nothing for LoRA/prefix.
    Checkpoints are only written while the guard is quiet, so each one is a good state.
    """

    def __init__(self, run: RunDir, trainable: Trainable, on_disk: bool):
        self.run, self.trainable, self.on_disk = run, trainable, on_disk
        self.copy: tuple[dict, dict, TrainState] | None = None

    def mark(self, state: TrainState) -> None:
        """``state`` (weights settled) is good: remember it, unless a checkpoint on disk already does."""
        if self.on_disk and self.run.checkpoints():
            self.copy = None
            return
        get = self.trainable.get_optimizer_state
        optimizer = {k: (v.detach().to("cpu", copy=True), v.device) for k, v in ((get() or {}) if get else {}).items()}
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in self.trainable.tensors.items()}
        self.copy = (tensors, optimizer, copy.deepcopy(state))

    def restore(self) -> TrainState:
        """Load the last good weights and optimizer state; returns the trainer state saved with them."""
        if self.copy is None:
            tensors, saved, flat = self.run.load_checkpoint(self.run.checkpoints()[-1])
            state = TrainState(**{k: v for k, v in saved.items() if k not in HF_STATE_KEYS})
        else:
            tensors, optimizer, state = self.copy
            flat = {k: v.to(device) for k, (v, device) in optimizer.items()}
            state = copy.deepcopy(state)
        self.trainable.load(tensors)
        if self.trainable.set_optimizer_state:   # also when empty: a rollback to the start clears the state
            self.trainable.set_optimizer_state(flat)
        return state


def train_loop(run: RunDir, *, steps: int, eval_every: int, save_every: int | None,
               step_fn: Callable[..., dict], dev_fn: Callable[[], float], trainable: Trainable,
               resume: bool = False, progress: bool = True, metric_name: str = "acc",
               on_save: Callable[[int, dict], None] | None = None,
               on_resume: Callable[[TrainState | None], TrainState | None] | None = None,
               save_weights: bool = True, writer: bool = True, report_to: str = "none",
               export: Callable[[Path], None] | None = None, guard: Guard | None = None,
               on_rollback: Callable[[int], None] | None = None,
               reference: Callable[[], float] | None = None) -> TrainState:
    """Run ``step_fn`` for steps [start, steps), evaluating, logging and checkpointing.

    ``on_save(step, state)`` runs at every checkpoint, before the weights are written (MeZO writes
    its trajectory there). On resume, ``on_resume(state)`` gets the state of the last weight
    checkpoint (None if there is none) and returns the state to continue from (or its dict): MeZO
    rebuilds the weights by replaying its trajectory when no weight checkpoint exists.

    ``writer`` is False on torchrun ranks > 0, which show no bar and print nothing. With
    ``progress`` off, each dev evaluation prints one line to stderr instead of the bar.
    ``report_to="tensorboard"`` also logs every record as TensorBoard scalars under ``run/tensorboard/``.
    ``export(folder)`` writes a model folder HF loads into ``best/`` beside its tensors.
    With a ``guard``, ``step_fn(step, lr_scale=s)`` must scale its lr by ``s``; a divergence rolls
    the weights back to the last good state (:class:`LastGood`), halves ``s``, logs it, and calls
    ``on_rollback(step)`` with the step training continues from (MeZO cuts its trajectory there).
    ``reference()``, the loss on fixed training batches at the current (settled) weights, lets the
    guard judge a climbing loss before it rolls back (:mod:`zoft.guard`).

    Returns the final state; the best weights are in ``run.path / "best"``.
    """
    state = TrainState()
    save_every = save_every or eval_every
    if resume:
        loaded = None
        if run.checkpoints():
            last = run.checkpoints()[-1]
            tensors, saved, optimizer = run.load_checkpoint(last)
            trainable.load(tensors)
            if optimizer and trainable.set_optimizer_state:
                trainable.set_optimizer_state(optimizer)
            try:
                loaded = TrainState(**{k: v for k, v in saved.items() if k not in HF_STATE_KEYS})
            except TypeError:
                raise ZoftError(f"{last / 'trainer_state.json'}: corrupt (unexpected fields)") from None
        if on_resume is not None:
            loaded = on_resume(loaded)
            loaded = TrainState(**loaded) if isinstance(loaded, dict) else loaded
        state = loaded or TrainState()   # killed before the first checkpoint: start over
        # rollback events logged after this checkpoint carry a higher count: the rerun logs them again
        rollbacks = state.guard.get("rollbacks", 0)
        run.truncate_metrics(state.step, keep=lambda r: r.get("rollback", 0) <= rollbacks)

    guarded = GuardState(**state.guard)
    last_good = LastGood(run, trainable, on_disk=save_weights) if guard else None
    reference = reference if guard else None

    def measure_reference() -> float:   # at settled weights: θ, not a pending ±εz
        trainable.settle()
        return reference()

    if guard:
        trainable.settle()
        guard.check_weights(guarded, trainable.tensors.values())   # records the starting norm
        if reference is not None and guarded.reference is None:
            guard.record_reference(guarded, measure_reference())
        state.guard = guarded.to_dict()
        last_good.mark(state)

    def save(step: int, reference_loss: float | None) -> None:
        state.step = step
        if reference_loss is not None:   # this checkpoint becomes the last good state: its reference loss counts
            guard.record_reference(guarded, reference_loss)
        state.guard = guarded.to_dict()
        if on_save is not None:
            on_save(step, dict(state.__dict__))
        if save_weights:
            optimizer = trainable.get_optimizer_state() if trainable.get_optimizer_state else None
            run.save_checkpoint(step, trainable.tensors, hf_trainer_state(state, run, steps, metric_name), optimizer)
        if last_good is not None:
            last_good.mark(state)

    start_time = time.perf_counter() - state.elapsed
    progress = progress and writer
    bar = tqdm(total=steps, initial=state.step, disable=not progress, dynamic_ncols=True, desc="train")
    metrics_out = metric_writer(report_to if writer else "none", run.path, metric_name)
    def kept() -> str:
        last = run.checkpoints()
        return f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"

    def roll_back(done: int, reason: str, lr: float | None) -> TrainState:
        """Back to the last good state with the lr halved; stops after ``guard.max_rollbacks``."""
        nonlocal guarded
        if guarded.rollbacks >= guard.max_rollbacks:
            raise DivergedError(f"{run.path}: training diverged: step {done}: {reason}, after {guarded.rollbacks} "
                                f"rollbacks with the lr halved each time (guard_max_rollbacks)")
        trainable.settle()   # no pending perturbation may survive under the restored weights
        restored = last_good.restore()
        # best/ on disk holds the best dev weights seen so far, also from the abandoned steps
        restored.best_metric, restored.best_step = state.best_metric, state.best_step
        restored.elapsed = time.perf_counter() - start_time
        scale, rollbacks = guarded.lr_scale / 2, guarded.rollbacks + 1
        guarded = GuardState(**restored.guard)
        guarded.lr_scale, guarded.rollbacks = scale, rollbacks
        restored.guard = guarded.to_dict()
        run.truncate_metrics(restored.step)
        if on_rollback is not None:
            on_rollback(restored.step)
        event = {"step": restored.step, "event": "rollback", "rollback": rollbacks, "from_step": done,
                 "reason": reason, "lr_scale": scale, **({"lr": lr / 2} if lr is not None else {})}
        run.log(event)
        log.warning("%s: step %d: %s; rolled back to step %d, lr halved (× %g; rollback %d of %d)",
                    run.path, done, reason, restored.step, scale, rollbacks, guard.max_rollbacks)
        bar.n = restored.step
        bar.refresh()
        return restored

    step, last_lr = state.step, None
    while step < steps:
        done = step + 1   # steps count from 1 in metrics.jsonl, checkpoint-N and every message
        try:
            reason = None
            try:
                record = step_fn(step, lr_scale=guarded.lr_scale) if guard else step_fn(step)
            except RuntimeError as e:
                if "without overflow" not in str(e):   # a real bug keeps its traceback
                    raise
                if guard is None:
                    raise DivergedError(f"step {done}: the update overflows the weights' number format "
                                        f"(learning rate too large?); training stopped") from None
                reason = "the update overflows the weights' number format"
            except DivergedError as e:
                if guard is None:
                    raise
                reason = e.reason
            if reason is None:
                faults.step_done(done)
                record["loss"] = faults.loss(done, record["loss"], guarded.lr_scale)
                last_lr = record.get("lr", last_lr)
                record = {"step": done, **record, "elapsed": round(time.perf_counter() - start_time, 3)}
                if guard:
                    alarms = guarded.false_alarms
                    # an injected climb (faults) moves the reference loss too, as a real one would
                    judge = None if reference is None else (
                        lambda: faults.loss(done, measure_reference(), guarded.lr_scale, reference=True))
                    reason = guard.observe(guarded, record["loss"], judge)
                    if guarded.false_alarms > alarms:
                        check = {k: round(v, 6) for k, v in guarded.last_check.items()}
                        run.log({"step": done, "event": "guard_check", "verdict": "no climb", **check})
                        log.warning("%s: step %d: loss EMA %.4g > %.4g, but the reference batches' loss %.4g "
                                    "≤ %.4g (%g× that of the last good state): no rollback", run.path, done,
                                    check["loss_ema"], check["limit"], check["reference"],
                                    check["reference_limit"], guard.factor)
            checks = done % eval_every == 0 or done % save_every == 0 or done == steps
            if reason is None and checks:
                trainable.settle()   # eval and checkpoints must see θ, not a pending perturbation
            # the weights, at every eval and checkpoint and every WEIGHT_CHECK_EVERY steps (a loss
            # behind a norm layer can stay finite while the weights grow without bound); a fused
            # step's pending ±εz is left in place between checks: the norm hardly notices it
            if reason is None and guard and (checks or done % WEIGHT_CHECK_EVERY == 0):
                reason = guard.check_weights(guarded, trainable.tensors.values())
            checkpoint, reference_loss = done % save_every == 0 or done == steps, None
            if reason is None and checkpoint and reference is not None:   # only good states are saved
                reference_loss = faults.loss(done, measure_reference(), guarded.lr_scale, reference=True)
                reason = guard.check_reference(guarded, reference_loss)
                record["reference"] = round(reference_loss, 6)   # in metrics.jsonl: how far a slow climb has gone
            if reason is not None:
                state = roll_back(done, reason, last_lr)
                step = state.step
                continue
            if done % eval_every == 0 or done == steps:
                eval_start = time.perf_counter()
                record["dev"] = dev = dev_fn()
                eval_seconds = time.perf_counter() - eval_start
                if state.best_metric is None or dev > state.best_metric:
                    state.best_metric, state.best_step = dev, done
                    run.save_best(trainable.tensors, {"step": done, "dev": dev, "global_step": done,
                                                      "best_metric": dev}, export=export)
                if writer and not progress:
                    print(f"dev step {done}: {metric_name} {dev:.4f}, best {state.best_metric:.4f} at step "
                          f"{state.best_step} ({eval_seconds:.1f} s)", file=sys.stderr, flush=True)
            run.log(record)
            if metrics_out is not None:
                metrics_out.write(record)
            state.elapsed = time.perf_counter() - start_time
            bar.set_postfix({"loss": f"{record['loss']:.4f}",
                             f"best dev {metric_name}": f"{state.best_metric or 0:.3f}"}, refresh=False)
            bar.update(1)
            if checkpoint:
                save(done, reference_loss)
            step += 1
        except (DivergedError, WriteError) as e:
            bar.close()
            raise type(e)(f"{e}; {kept()}") from None
    if metrics_out is not None:   # each write was flushed: an exception above loses nothing
        metrics_out.close()
    bar.close()
    state.step = steps
    return state

"""The training loop shared by every trained method (MeZO, FT, LP-FT).

A method supplies ``step_fn(step) -> record``; this loop owns everything around it:
the progress bar, dev evaluation every N steps with the best weights kept, metrics.jsonl,
atomic checkpoints, resume and the NaN/inf guard.

Resume is exact because nothing here carries hidden RNG state: batches and MeZO
directions are pure functions of (seed, step), so a run restarted from checkpoint-N
replays steps N, N+1, ... exactly as the uninterrupted run did.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from zoft import faults
from zoft.errors import ZoftError
from zoft.atomic import WriteError
from zoft.runs import RunDir


class DivergedError(ZoftError):
    """The loss became NaN or inf; training stopped before applying the bad step."""


def check_finite(step: int, **values: float) -> None:
    """Raise DivergedError if a value is NaN or inf; ``step`` counts from 1, as metrics.jsonl does."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise DivergedError(f"step {step}: {name} is {value}; training stopped before applying this step")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of ``step``: epoch-wise shuffling, as a pure function of (seed, step)."""
    if n <= batch_size:
        return list(range(n))
    steps_per_epoch = n // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size].tolist()


@dataclass
class TrainState:
    """What a checkpoint stores beside the weights (trainer_state.json)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


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


def train_loop(run: RunDir, *, steps: int, eval_every: int, save_every: int | None,
               step_fn: Callable[[int], dict], dev_fn: Callable[[], float], trainable: Trainable,
               resume: bool = False, progress: bool = True, metric_name: str = "acc",
               on_save: Callable[[int, dict], None] | None = None,
               on_resume: Callable[[TrainState | None], TrainState | None] | None = None,
               save_weights: bool = True) -> TrainState:
    """Run ``step_fn`` for steps [start, steps), evaluating, logging and checkpointing.

    ``on_save(step, state)`` runs at every checkpoint, before the weights are written (MeZO writes
    its trajectory there). On resume, ``on_resume(state)`` gets the state of the last weight
    checkpoint (None if there is none) and returns the state to continue from (or its dict): MeZO
    rebuilds the weights by replaying its trajectory when no weight checkpoint exists.

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
                loaded = TrainState(**saved)
            except TypeError:
                raise ZoftError(f"{last / 'trainer_state.json'}: corrupt (unexpected fields)") from None
        if on_resume is not None:
            loaded = on_resume(loaded)
            loaded = TrainState(**loaded) if isinstance(loaded, dict) else loaded
        state = loaded or TrainState()   # killed before the first checkpoint: start over
        run.truncate_metrics(state.step)

    def save(step: int) -> None:
        state.step = step
        if on_save is not None:
            on_save(step, dict(state.__dict__))
        if save_weights:
            optimizer = trainable.get_optimizer_state() if trainable.get_optimizer_state else None
            run.save_checkpoint(step, trainable.tensors, state.__dict__, optimizer)

    start_time = time.perf_counter() - state.elapsed
    bar = tqdm(total=steps, initial=state.step, disable=not progress, dynamic_ncols=True, desc="train")
    def kept() -> str:
        last = run.checkpoints()
        return f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"

    for step in range(state.step, steps):
        done = step + 1   # steps count from 1 in metrics.jsonl, checkpoint-N and every message
        try:
            try:
                record = step_fn(step)
            except RuntimeError as e:
                if "without overflow" not in str(e):   # a real bug keeps its traceback
                    raise
                raise DivergedError(f"step {done}: the update overflows the weights' number format "
                                    f"(learning rate too large?); training stopped") from None
            faults.step_done(done)
            record = {"step": done, **record, "elapsed": round(time.perf_counter() - start_time, 3)}
            if done % eval_every == 0 or done % save_every == 0 or done == steps:
                trainable.settle()   # eval and checkpoints must see θ, not a pending perturbation
            if done % eval_every == 0 or done == steps:
                record["dev"] = dev = dev_fn()
                if state.best_metric is None or dev > state.best_metric:
                    state.best_metric, state.best_step = dev, done
                    run.save_best(trainable.tensors, {"step": done, "dev": dev})
            run.log(record)
            state.elapsed = time.perf_counter() - start_time
            bar.set_postfix({"loss": f"{record['loss']:.4f}",
                             f"best dev {metric_name}": f"{state.best_metric or 0:.3f}"}, refresh=False)
            bar.update(1)
            if done % save_every == 0 or done == steps:
                save(done)
        except (DivergedError, WriteError) as e:
            bar.close()
            raise type(e)(f"{e}; {kept()}") from None
    bar.close()
    state.step = steps
    return state

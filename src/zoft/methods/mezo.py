"""MeZO: fine-tuning with forward passes only (Malladi et al., 2023).

Each step: sample a batch and n seeds, estimate the projected gradient of each seed's
direction with two forward passes (SPSA), then apply θ ← θ − lr·mean(g·z) with z
regenerated from the seed. Works in full, LoRA and prefix modes, and with a
non-differentiable objective (minus accuracy or F1 on the batch) in place of the loss.
"""
from __future__ import annotations

import torch

from zoft import distributed
from zoft.adapters import named_trainable
from zoft.methods.common import Setup, evaluate, finish
from zoft.methods.replay import TrajectoryRecorder
from zoft.offload import Offloader
from zoft.tasks import compute_metric
from zoft.training import Trainable, batch_indices, check_finite, direction_seed, train_loop
from zoft.zo import SPSA, ZOSGD, get_backend, learning_rate
from zoft.zo.step import zo_step


def zo_components(cfg, backend: str | None = None):
    """The estimator and optimizer a config names: training, resume and replay all build them here."""
    estimator = SPSA(eps=cfg.eps, n_directions=cfg.n_directions, distribution=cfg.distribution,
                     backend=get_backend(backend or cfg.backend, cfg.device))
    return estimator, ZOSGD(weight_decay=cfg.weight_decay)


def make_objective(setup: Setup, scorer, enc, examples):
    """The scalar MeZO minimises on a batch: the LM loss, or minus a metric (no gradient needed)."""
    objective = setup.cfg.objective
    if objective == "loss":
        return lambda idx: scorer.loss(enc, idx).item()
    metric = "squad_f1" if setup.task.kind == "generation" and objective == "f1" else objective

    def negative_metric(idx):
        sub = [examples[i] for i in idx]
        preds = (scorer.predict(enc, idx) if setup.task.kind != "generation"
                 else scorer.generate(enc, idx, max_new_tokens=(setup.task.generation_kwargs or {}).get("max_gen_toks", 32)))
        return -compute_metric(metric, preds, sub)
    return negative_metric


def run(setup: Setup, run_dir, resume: bool = False, par: distributed.Parallel | None = None) -> dict:
    """Train with MeZO; ``par`` (from ``zoft.distributed``) makes it data- or direction-parallel."""
    cfg, task, data = setup.cfg, setup.task, setup.data
    model = setup.with_mode()
    model.eval()   # no dropout: L+ and L− must see the same function
    offloader = Offloader(model, cfg.device) if cfg.offload else None   # blocks stream from CPU memory
    scorer = setup.scorer(model)
    enc_train, enc_dev = scorer.encode(data.train), scorer.encode(data.dev)
    objective = make_objective(setup, scorer, enc_train, data.train)

    named = named_trainable(model)
    params = list(named.values())
    estimator, optimizer = zo_components(cfg)
    if offloader is not None:
        estimator.backend = offloader.backend(estimator.backend, params)
    writer = par is None or par.is_writer
    recorder = TrajectoryRecorder(setup, run_dir, named, estimator, optimizer, par) if cfg.trajectory else None

    @torch.no_grad()
    def step_fn(step: int) -> dict:
        idx = batch_indices(len(enc_train), cfg.batch_size, cfg.seed, step)
        seeds = (par.seeds(cfg.seed, step, cfg.n_directions) if par else
                 [direction_seed(cfg.seed, step, k) for k in range(cfg.n_directions)])
        loss_fn = par.loss_fn(objective, idx, step) if par else (lambda: objective(idx))
        tape: list[float] = []   # the objective values in call order: all replay needs of the forwards

        def taped_loss() -> float:
            tape.append(float(loss_fn()))
            return tape[-1]
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
        estimate = zo_step(params, taped_loss, seeds, lr, estimator, optimizer,
                           exchange=par.exchange(step) if par else None,
                           check=lambda e: check_finite(step, loss=e.loss,
                                                        projected_grad=sum(g for _, g in e.directions)))
        if recorder is not None:
            recorder.record(estimate, lr, tape)
        grads = [g for _, g in estimate.directions]
        return {"loss": estimate.loss, "projected_grad": sum(grads) / len(grads), "lr": lr}

    def dev_fn() -> float:
        if not writer:   # only rank 0 keeps the best weights; the others would evaluate for nothing
            return 0.0
        metric = evaluate(scorer, enc_dev, data.dev, task, cfg.eval_batch_size)[task.metric]
        settle()   # the best weights are saved from the CPU copies next
        return metric

    def settle() -> None:   # offload: run the passes still queued for blocks in CPU memory
        if offloader is not None:
            offloader.settle()

    def on_save(step: int, state: dict) -> None:
        settle()
        if recorder is not None and writer:
            recorder.save(step, state)

    trainable = Trainable(named)
    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=step_fn, dev_fn=dev_fn, trainable=trainable, resume=resume,
                       progress=cfg.progress and writer, metric_name=task.metric,
                       on_save=on_save,
                       on_resume=recorder.resume if recorder else None, save_weights=cfg.save_weights)
    settle()
    if not writer:
        return {"rank": par.rank}
    return finish(setup, run_dir, scorer, trainable, state)

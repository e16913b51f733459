"""MeZO: fine-tuning with forward passes only (Malladi et al., 2023), and its ZO relatives.

Each step: sample a batch and n seeds, estimate the projected gradient of each seed's
direction with forward passes only (SPSA two- or one-sided, FZOO or LOZO: ``estimator=``),
then let a ZO optimizer (``optimizer=``: ZO-SGD, momentum, sign, conservative, Adam) apply
it with z regenerated from the seed. Works in full, LoRA and prefix modes, and with a
non-differentiable objective (minus accuracy or F1 on the batch) in place of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from zoft.adapters import named_trainable
from zoft.errors import ZoftError
from zoft.methods.common import Setup, evaluate, finish
from zoft.tasks import compute_metric
from zoft.training import Trainable, batch_indices, check_finite, direction_seed, train_loop
from zoft.zo import FZOO, LOZO, SPSA, LowRankBackend, build_optimizer, get_backend, learning_rate
from zoft.zo.flat import flatten_


def make_objective(setup: Setup, scorer, enc, examples):
    """The scalar MeZO minimises on a batch: the LM loss, or minus a metric (no gradient needed)."""
    cfg, objective = setup.cfg, setup.cfg.objective
    if objective == "loss":
        if cfg.compile != "off":   # fixed shapes, pre-tokenised on the device, compiled forward
            from zoft.compile import FixedShapeLoss
            return FixedShapeLoss(scorer, enc, compile=cfg.compile)
        return lambda idx: scorer.loss(enc, idx).item()
    if cfg.compile != "off":
        raise ZoftError("compile applies to objective=loss only")
    metric = "squad_f1" if setup.task.kind == "generation" and objective == "f1" else objective

    def negative_metric(idx):
        sub = [examples[i] for i in idx]
        preds = (scorer.predict(enc, idx) if setup.task.kind != "generation"
                 else scorer.generate(enc, idx, max_new_tokens=(setup.task.generation_kwargs or {}).get("max_gen_toks", 32)))
        return -compute_metric(metric, preds, sub)
    return negative_metric


def make_estimator(cfg, device):
    """The estimator a config names, on the config's perturbation backend."""
    backend = get_backend(cfg.backend, device)
    if cfg.estimator == "fzoo":
        return FZOO(eps=cfg.eps, n_directions=cfg.n_directions, backend=backend)
    if cfg.estimator == "lozo":
        return LOZO(eps=cfg.eps, n_directions=cfg.n_directions, rank=cfg.lozo_rank, nu=cfg.lozo_nu,
                    seed=cfg.seed, backend=LowRankBackend(cfg.lozo_rank, dense=backend))
    return SPSA(eps=cfg.eps, n_directions=cfg.n_directions, distribution=cfg.distribution,
                backend=backend, one_sided=cfg.one_sided)


@dataclass
class ZOStep:
    """One configured ZO training step: ``step_fn(step) -> record`` plus what it trains."""

    step_fn: Callable[[int], dict]
    params: list[torch.Tensor]     # what the backend perturbs: the tensors, or their flat buffers
    optimizer: object
    trainable: Trainable


def build_step(cfg, model, objective, n_train: int) -> ZOStep:
    """Wire estimator, optimizer, (flat) parameters and LR schedule into a step function."""
    named = named_trainable(model)
    if cfg.flat_params and cfg.estimator == "lozo":
        raise ZoftError("flat_params=true flattens matrices, which LOZO needs; use one or the other")
    if cfg.flat_params and cfg.weight_decay:
        raise ZoftError("flat_params=true cannot tell matrices from biases for weight decay; set weight_decay=0")
    params = flatten_(list(named.values())) if cfg.flat_params else list(named.values())
    estimator = make_estimator(cfg, next(iter(named.values())).device)
    optimizer = build_optimizer(cfg.optimizer, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))

    @torch.no_grad()
    def step_fn(step: int) -> dict:
        idx = batch_indices(n_train, cfg.batch_size, cfg.seed, step)
        seeds = [direction_seed(cfg.seed, step, k) for k in range(cfg.n_directions)]
        loss_fn = lambda: objective(idx)   # noqa: E731
        estimate = estimator.estimate(params, loss_fn, seeds, step=step)
        grads = [g for _, g in estimate.directions]
        check_finite(step, loss=estimate.loss, projected_grad=sum(grads))
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
        optimizer.update(params, estimate, lr, estimator.backend, estimator.distribution, loss_fn=loss_fn)
        return {"loss": estimate.loss, "projected_grad": sum(grads) / len(grads), "lr": lr,
                "forwards": estimate.forwards, **estimate.extra}

    state = optimizer.state_dict
    trainable = Trainable(named, get_optimizer_state=lambda: state() or None,
                          set_optimizer_state=optimizer.load_state_dict)
    return ZOStep(step_fn, params, optimizer, trainable)


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    cfg, task, data = setup.cfg, setup.task, setup.data
    model = setup.with_mode()
    model.eval()   # no dropout: L+ and L− must see the same function
    scorer = setup.scorer(model)
    enc_train, enc_dev = scorer.encode(data.train), scorer.encode(data.dev)
    objective = make_objective(setup, scorer, enc_train, data.train)
    zo = build_step(cfg, model, objective, len(enc_train))

    def dev_fn() -> float:
        return evaluate(scorer, enc_dev, data.dev, task, cfg.eval_batch_size)[task.metric]

    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=zo.step_fn, dev_fn=dev_fn, trainable=zo.trainable, resume=resume,
                       progress=cfg.progress, metric_name=task.metric)
    return finish(setup, run_dir, scorer, zo.trainable, state)

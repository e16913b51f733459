"""MeZO: fine-tuning with forward passes only (Malladi et al., 2023).

Each step: sample a batch and n seeds, estimate the projected gradient of each seed's
direction with two forward passes (SPSA), then apply θ ← θ − lr·mean(g·z) with z
regenerated from the seed. Works in full, LoRA and prefix modes, and with a
non-differentiable objective (minus accuracy or F1 on the batch) in place of the loss.
"""
from __future__ import annotations

import torch

from zoft.adapters import named_trainable
from zoft.methods.common import Setup, evaluate, finish
from zoft.tasks import compute_metric
from zoft.training import Trainable, batch_indices, check_finite, direction_seed, train_loop
from zoft.zo import SPSA, ZOSGD, get_backend, learning_rate
from zoft.zo.fused import FusedZOSGD


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


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    cfg, task, data = setup.cfg, setup.task, setup.data
    model = setup.with_mode()
    model.eval()   # no dropout: L+ and L− must see the same function
    scorer = setup.scorer(model)
    enc_train, enc_dev = scorer.encode(data.train), scorer.encode(data.dev)
    objective = make_objective(setup, scorer, enc_train, data.train)

    named = named_trainable(model)
    params = list(named.values())
    estimator = SPSA(eps=cfg.eps, n_directions=cfg.n_directions, distribution=cfg.distribution,
                     backend=get_backend(cfg.backend, cfg.device))
    optimizer = ZOSGD(weight_decay=cfg.weight_decay)
    # plain ZO-SGD with one direction: 2 weight passes per step instead of 4 (zo/fused.py)
    fused = (FusedZOSGD(params, estimator.backend, cfg.eps, cfg.distribution)
             if cfg.n_directions == 1 and not cfg.weight_decay and getattr(cfg, "optimizer", "zo-sgd") == "zo-sgd"
             and hasattr(estimator.backend, "combine_") else None)

    @torch.no_grad()
    def step_fn(step: int) -> dict:
        idx = batch_indices(len(enc_train), cfg.batch_size, cfg.seed, step)
        seeds = [direction_seed(cfg.seed, step, k) for k in range(cfg.n_directions)]
        if fused is not None:
            lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
            next_seed = direction_seed(cfg.seed, step + 1) if step + 1 < cfg.steps else None
            loss_plus, loss_minus, g = fused.step(lambda: objective(idx), seeds[0], lr, next_seed)
            check_finite(step, loss=(loss_plus + loss_minus) / 2, projected_grad=g)
            return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, "lr": lr}
        estimate = estimator.estimate(params, lambda: objective(idx), seeds)
        grads = [g for _, g in estimate.directions]
        check_finite(step, loss=estimate.loss, projected_grad=sum(grads))
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
        optimizer.update(params, estimate, lr, estimator.backend, cfg.distribution)
        return {"loss": estimate.loss, "projected_grad": sum(grads) / len(grads), "lr": lr}

    def dev_fn() -> float:
        return evaluate(scorer, enc_dev, data.dev, task, cfg.eval_batch_size)[task.metric]

    trainable = Trainable(named, settle=fused.settle if fused is not None else lambda: None)
    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=step_fn, dev_fn=dev_fn, trainable=trainable, resume=resume,
                       progress=cfg.progress, metric_name=task.metric)
    return finish(setup, run_dir, scorer, trainable, state)

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

from zoft import distributed
from zoft.adapters import MODES, named_trainable
from zoft.errors import ZoftError
from zoft.methods.common import Setup, evaluate, finish, load_trained_lm
from zoft.methods.registry import Method, register_method
from zoft.methods.replay import TrajectoryRecorder
from zoft.offload import Offloader
from zoft.tasks import compute_metric
from zoft.training import Trainable, batch_indices, check_finite, direction_seed, train_loop
from zoft.zo import FZOO, LOZO, SPSA, LowRankBackend, build_optimizer, get_backend, learning_rate
from zoft.zo.estimator import Estimate
from zoft.zo.flat import flatten_
from zoft.zo.fused import FusedZOSGD
from zoft.zo.step import zo_step


def make_objective(setup: Setup, scorer, enc, examples):
    """The scalar MeZO minimises on a batch: the LM loss, or minus a metric (no gradient needed)."""
    cfg, objective = setup.cfg, setup.cfg.objective
    if objective == "loss":
        if cfg.compile != "off":   # fixed shapes, pre-tokenised on the device, compiled forward
            from zoft.compile import FixedShapeLoss
            return FixedShapeLoss(scorer, enc, compile=cfg.compile)
        def loss(idx: list[int]) -> float:
            return scorer.loss(enc, idx).item()
        # both SPSA losses from one forward over the batch stacked on itself (offload's dual forward)
        loss.pair = lambda idx: tuple(x.item() for x in scorer.loss_pair(enc, idx))
        return loss
    if cfg.compile != "off":
        raise ZoftError("compile applies to objective=loss only")
    metric = "squad_f1" if setup.task.kind == "generation" and objective == "f1" else objective

    def negative_metric(idx):
        sub = [examples[i] for i in idx]
        preds = (scorer.predict(enc, idx) if setup.task.kind != "generation"
                 else scorer.generate(enc, idx, max_new_tokens=(setup.task.generation_kwargs or {}).get("max_gen_toks", 32)))
        return -compute_metric(metric, preds, sub)
    return negative_metric


def make_estimator(cfg, device, backend: str | None = None):
    """The estimator a config names, on the config's perturbation backend (or ``backend``)."""
    backend = get_backend(backend or cfg.backend, device)
    if cfg.estimator == "fzoo":
        return FZOO(eps=cfg.eps, n_directions=cfg.n_directions, backend=backend)
    if cfg.estimator == "lozo":
        return LOZO(eps=cfg.eps, n_directions=cfg.n_directions, rank=cfg.lozo_rank, nu=cfg.lozo_nu,
                    seed=cfg.seed, backend=LowRankBackend(cfg.lozo_rank, dense=backend))
    return SPSA(eps=cfg.eps, n_directions=cfg.n_directions, distribution=cfg.distribution,
                backend=backend, one_sided=cfg.one_sided)


def zo_components(cfg, device=None, backend: str | None = None):
    """The estimator and optimizer a config names: training, resume and replay all build them here."""
    estimator = make_estimator(cfg, device or cfg.device, backend)
    optimizer = build_optimizer(cfg.optimizer, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))
    return estimator, optimizer


def trained_params(cfg, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What the backend perturbs: the trained tensors, or (``flat_params``) one flat buffer per dtype.

    Training and replay both take their parameter list from here: z's layout follows it.
    (``Config.validate`` refuses the combinations a flat buffer cannot serve.)
    """
    return flatten_(list(named.values())) if cfg.flat_params else list(named.values())


@dataclass
class ZOStep:
    """One configured ZO training step: ``step_fn(step) -> record`` plus what it trains."""

    step_fn: Callable[[int], dict]
    params: list[torch.Tensor]     # what the backend perturbs: the tensors, or their flat buffers
    estimator: object
    optimizer: object
    trainable: Trainable
    fused: FusedZOSGD | None = None   # the 2-pass step, when the configuration allows it
    recorder: object = None        # a TrajectoryRecorder, if the run keeps its trajectory


def fused_stepper(cfg, params, estimator, par=None, offloader=None) -> FusedZOSGD | None:
    """The 2-pass fused step (zo/fused.py) where it computes the same update as zo_step: one
    two-sided SPSA direction, plain ZO-SGD without weight decay, a backend with ``combine_``, one
    process, no offload, and ``fused=true`` (the default). Training and replay both decide here."""
    plain = (cfg.fused and cfg.estimator == "spsa" and not cfg.one_sided and cfg.n_directions == 1
             and cfg.optimizer == "zo-sgd" and not cfg.weight_decay)
    if not plain or par is not None or offloader is not None or not hasattr(estimator.backend, "combine_"):
        return None
    return FusedZOSGD(params, estimator.backend, cfg.eps, cfg.distribution)


def settles_after(cfg, done: int) -> bool:
    """Whether ``training.train_loop`` settles the weights after step ``done`` (eval or save)."""
    save_every = cfg.save_every or cfg.eval_every
    return done % cfg.eval_every == 0 or done % save_every == 0 or done == cfg.steps


def fused_next_seed(cfg, step: int) -> int | None:
    """The direction the fused step leaves pending after ``step`` (None after the last step)."""
    return direction_seed(cfg.seed, step + 1) if step + 1 < cfg.steps else None


def build_step(cfg, model, objective, n_train: int, par: distributed.Parallel | None = None,
               offloader: Offloader | None = None) -> ZOStep:
    """Wire batches, seeds, estimator, optimizer, (flat) parameters and LR schedule into a step function."""
    named = named_trainable(model)
    params = trained_params(cfg, named)
    estimator, optimizer = zo_components(cfg, next(iter(named.values())).device)
    if offloader is not None:
        estimator.backend = offloader.backend(estimator.backend, params)
    fused = fused_stepper(cfg, params, estimator, par, offloader)

    @torch.no_grad()
    def step_fn(step: int) -> dict:
        idx = batch_indices(n_train, cfg.batch_size, cfg.seed, step)
        seeds = (par.seeds(cfg.seed, step, cfg.n_directions) if par else
                 [direction_seed(cfg.seed, step, k) for k in range(cfg.n_directions)])
        loss_fn = par.loss_fn(objective, idx, step) if par else (lambda: objective(idx))
        tape: list[float] = []   # the objective values in call order: all replay needs of the forwards

        def taped_loss() -> float:
            tape.append(float(loss_fn()))
            return tape[-1]
        if offloader is not None and hasattr(objective, "pair"):
            def taped_pair() -> tuple[float, float]:   # L+ and L− of one dual forward, taped in probe order
                pair = tuple(float(x) for x in objective.pair(idx))
                tape.extend(pair)
                return pair
            taped_loss.pair = taped_pair
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
        if fused is not None:   # 2 weight passes: this step's update fused with the next +εz
            loss_plus, loss_minus, g = fused.step(taped_loss, seeds[0], lr, fused_next_seed(cfg, step))
            check_finite(step + 1, loss=(loss_plus + loss_minus) / 2, projected_grad=g)
            if zo.recorder is not None:
                zo.recorder.record(Estimate(loss=(loss_plus + loss_minus) / 2, directions=[(seeds[0], g)]), lr, tape)
            return {"loss": (loss_plus + loss_minus) / 2, "projected_grad": g, "lr": lr, "forwards": 2}
        estimate = zo_step(params, taped_loss, seeds, lr, estimator, optimizer, step=step,
                           exchange=par.exchange(step) if par else None,
                           check=lambda e: check_finite(step + 1, loss=e.loss,
                                                            projected_grad=sum(g for _, g in e.directions)))
        if zo.recorder is not None:
            zo.recorder.record(estimate, lr, tape)
        grads = [g for _, g in estimate.directions]
        return {"loss": estimate.loss, "projected_grad": sum(grads) / len(grads), "lr": lr,
                "forwards": estimate.forwards, **estimate.extra}

    state = optimizer.state_dict
    trainable = Trainable(named, get_optimizer_state=lambda: state() or None,
                          set_optimizer_state=optimizer.load_state_dict,
                          settle=fused.settle if fused is not None else (lambda: None))
    zo = ZOStep(step_fn, params, estimator, optimizer, trainable, fused)
    return zo


def run(setup: Setup, run_dir, resume: bool = False, par: distributed.Parallel | None = None) -> dict:
    """Train with MeZO; ``par`` (from ``zoft.distributed``) makes it data- or direction-parallel."""
    cfg, task, data = setup.cfg, setup.task, setup.data
    model = setup.with_mode()
    model.eval()   # no dropout: L+ and L− must see the same function
    # blocks stream from CPU memory; prefix tuning feeds its KV cache to the layers, which the
    # dual forward cannot split, so there L+ and L− stream the weights separately
    offloader = (Offloader(model, cfg.device, dual=cfg.offload_dual and cfg.mode != "prefix")
                 if cfg.offload else None)
    scorer = setup.scorer(model)
    enc_train, enc_dev = scorer.encode(data.train), scorer.encode(data.dev)
    objective = make_objective(setup, scorer, enc_train, data.train)

    zo = build_step(cfg, model, objective, len(enc_train), par=par, offloader=offloader)
    writer = par is None or par.is_writer
    if cfg.trajectory:
        zo.recorder = TrajectoryRecorder(setup, run_dir, zo.trainable.tensors, zo.estimator, zo.optimizer, par,
                                         params=zo.params, fused=zo.fused)
    recorder = zo.recorder

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

    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=zo.step_fn, dev_fn=dev_fn, trainable=zo.trainable, resume=resume,
                       progress=cfg.progress and writer, metric_name=task.metric,
                       on_save=on_save,
                       on_resume=recorder.resume if recorder else None, save_weights=cfg.save_weights)
    settle()
    if not writer:
        return {"rank": par.rank}
    return finish(setup, run_dir, scorer, zo.trainable, state)


register_method(Method("mezo", run, load=load_trained_lm, modes=MODES, trains=True, parallel=True, trajectory=True))

"""MeZO: fine-tuning with forward passes only (Malladi et al., 2023), and its ZO relatives.

Each step: sample a batch and n seeds, estimate the projected gradient of each seed's
direction with forward passes only (SPSA two- or one-sided, FZOO or LOZO: ``estimator=``),
then let a ZO optimizer (``optimizer=``: ZO-SGD, momentum, sign, conservative, Adam) apply
it with z regenerated from the seed. Works in full, LoRA and prefix modes, and with a
non-differentiable objective (minus accuracy or F1 on the batch) in place of the loss.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from zoft import distributed
from zoft.adapters import MODES, lora_changes, named_trainable
from zoft.config import AUTO
from zoft.errors import ZoftError
from zoft.guard import Guard
from zoft.methods.common import Setup, evaluate, finish, guard_reference, hf_export, load_trained_lm
from zoft.methods.finetune import install_probe, load_lp_ft
from zoft.methods.registry import Method, register_method
from zoft.offload import Offloader
from zoft.tasks import compute_metric
from zoft.training import Trainable, batch_indices, check_finite, train_loop
from zoft.zo import Objective, learning_rate
from zoft.zo.auto_lr import AutoLR, FunctionWeights, probe_lr, probe_seed
from zoft.zo.build import build_components, build_stepper, trained_params
from zoft.zo.schedule import direction_seed
from zoft.zo.step import Stepper
from zoft.zo.trajectory import FILENAME, TrajectoryRecorder, init_sha


def make_objective(setup: Setup, scorer, enc, examples) -> Objective:
    """The scalar MeZO minimises on a batch of example indices: the LM loss, or minus a metric (no gradient needed)."""
    cfg, objective = setup.cfg, setup.cfg.objective
    if objective == "loss":
        if cfg.compile != "off":   # fixed shapes, pre-tokenised on the device, compiled forward
            from zoft.compile import FixedShapeLoss
            return Objective(FixedShapeLoss(scorer, enc, compile=cfg.compile))
        return Objective(lambda idx: scorer.loss(enc, idx).item(),
                         pair=lambda idx: tuple(x.item() for x in scorer.loss_pair(enc, idx)))
    if cfg.compile != "off":
        raise ZoftError("compile applies to objective=loss only")
    metric = "squad_f1" if setup.task.kind == "generation" and objective == "f1" else objective

    def negative_metric(idx):
        sub = [examples[i] for i in idx]
        preds = (scorer.predict(enc, idx) if setup.task.kind != "generation"
                 else scorer.generate(enc, idx, max_new_tokens=(setup.task.generation_kwargs or {}).get("max_gen_toks", 32)))
        return -compute_metric(metric, preds, sub)
    return Objective(negative_metric)


@dataclass
class ZOStep:
    """One configured MeZO training step, ``step_fn(step) -> metrics``, and what it trains."""

    cfg: object
    objective: Objective
    n_train: int
    params: list[torch.Tensor]     # what the backend perturbs: the tensors, or their flat buffers
    backend: str                   # the perturbation backend's name ("auto" resolved)
    stepper: Stepper
    trainable: Trainable
    par: distributed.Parallel | None = None
    recorder: TrajectoryRecorder | None = None   # if the run keeps its trajectory
    function_weights: FunctionWeights | None = None   # LoRA: the adapted matrices, for lr=auto's cap

    @torch.no_grad()
    def step_fn(self, step: int, lr_scale: float = 1.0) -> dict:
        cfg, par = self.cfg, self.par
        idx = batch_indices(self.n_train, cfg.batch_size, cfg.seed, step)
        batch = self.objective.on(idx)
        if par:   # this rank's directions; the loss summed over the ranks' shards of the batch
            seeds = par.seeds(cfg.seed, step, cfg.n_directions)
            batch = Objective(par.loss_fn(self.objective, idx, step), batch.pair)
        else:
            seeds = [direction_seed(cfg.seed, step, k) for k in range(cfg.n_directions)]
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps) * lr_scale   # guard: 0.5ᵏ
        record = self.stepper.step(step, batch, seeds, lr, exchange=par.exchange(step) if par else None)
        if self.recorder is not None:
            self.recorder.append(record)
        estimate = record.estimate
        return {"loss": estimate.loss, "projected_grad": sum(record.grads) / len(record.grads), "lr": lr,
                "forwards": estimate.forwards, **estimate.extra}


def build_step(cfg, model, objective: Objective, n_train: int, par: distributed.Parallel | None = None,
               offloader: Offloader | None = None) -> ZOStep:
    """Wire batches, seeds, (flat) parameters, the stepper and the LR schedule into a step function."""
    named = named_trainable(model)
    params = trained_params(cfg, named)
    estimator, optimizer = build_components(cfg, next(iter(named.values())).device)
    # what draws z, under LOZO's and Sparse MeZO's wrappers ("lowrank", "sparse" are not backends a
    # config can name): the run records it, and replay and resume must use the same
    z_backend = getattr(estimator.backend, "dense", estimator.backend).name
    if offloader is not None:
        estimator.backend = offloader.backend(estimator.backend, params)

    def check(step: int, e) -> None:   # before the update: a NaN step leaves the weights as they were
        check_finite(step + 1, loss=e.loss, projected_grad=sum(g for _, g in e.directions))
    # the fused step keeps its pending +εz in one process's resident weights only
    stepper = build_stepper(cfg, params, estimator, optimizer, fuse=par is None and offloader is None, check=check)
    state = optimizer.state_dict
    trainable = Trainable(named, get_optimizer_state=lambda: state() or None,
                          set_optimizer_state=optimizer.load_state_dict, settle=stepper.settle)
    changes = lora_changes(model) if cfg.mode == "lora" else None
    return ZOStep(cfg, objective, n_train, params, z_backend, stepper, trainable, par,
                  function_weights=FunctionWeights(*changes) if changes else None)


def auto_lr(cfg, zo: ZOStep, measure: Objective) -> AutoLR:
    """``lr=auto`` (zoft.zo.auto_lr): probe p estimates on training batch p, with its own seeds, and
    judges the step by ``measure`` on that batch. A fresh estimator and optimizer of the run's kind
    do the probing, so the run's own stay untouched."""
    estimator, optimizer = build_components(cfg, zo.params[0].device)

    def batch(p: int) -> list[int]:
        return batch_indices(zo.n_train, cfg.batch_size, cfg.seed, p)
    # T_eff = Σ_t (lr_t / lr)²: how the run's steps add up as a random walk, for the drift cap. In full
    # mode the walk is of the weights themselves; in LoRA mode of the adapted matrices W₀ + s·B·A,
    # against |W₀|, simulated on noise since s·B·A is not linear in the steps (the adapter's own init
    # norm is no scale: A moves nothing while B = 0). Prefix mode has no weights to measure against: no cap.
    capped = cfg.mode == "full" or zo.function_weights is not None
    run_steps = (sum(learning_rate(t, cfg.steps, 1.0, cfg.lr_schedule, cfg.warmup_steps) ** 2 for t in range(cfg.steps))
                 if capped else 0.0)
    return probe_lr(zo.params, estimator, optimizer,
                    train_loss=lambda p: zo.objective.on(batch(p)), measure=lambda p: measure.on(batch(p)),
                    seeds=lambda p: [probe_seed(cfg.seed, p, k) for k in range(cfg.n_directions)],
                    run_steps=run_steps, function_weights=zo.function_weights)


def trajectory_header(setup: Setup, zo: ZOStep) -> dict:
    """What a trajectory needs to name its run: the base model, the adapter init, the config."""
    cfg, named = setup.cfg, zo.trainable.tensors
    return {"base": {"name": setup.loaded.name, "identity": setup.loaded.identity},
            "init_sha": init_sha(cfg.mode, named),
            "config": cfg.to_dict(),
            "backend": zo.backend,                          # "auto" resolved: replay must use the same z
            "device_type": next(iter(named.values())).device.type,
            "n_probed": cfg.n_directions,                   # seeds per step this process probed itself
            "parallel": cfg.parallel, "world_size": zo.par.world if zo.par else 1}


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
    # a metric is too coarse to judge one step (lr=auto) or a climb (the guard's reference) by
    measure = (objective if cfg.objective == "loss" else Objective(lambda idx: scorer.loss(enc_train, idx).item()))
    if cfg.lr == AUTO:   # before any step and before the trajectory header, which records the lr
        chosen = auto_lr(cfg, zo, measure)
        cfg.lr = chosen.lr
        if writer:   # config.yaml keeps the number: --resume continues with it, without a new probe
            run_dir.write_config(cfg.to_dict())
            run_dir.log({"step": 0, **chosen.record()})
        cap = "" if chosen.drift_cap is None else f", run-length cap {chosen.drift_cap:.3g}"
        if chosen.walk_sigma is not None:   # LoRA: the cap came from a simulated walk with this g
            cap += f" from a simulated walk at RMS g {chosen.walk_sigma:.3g}"
        print(f"zoft: lr=auto chose lr={chosen.lr:.3g} ({chosen.forwards} probe forwards; one-step optima "
              f"{', '.join('-' if x is None else f'{x:.3g}' for x in chosen.per_probe)} → {chosen.one_step:.3g}{cap})",
              file=sys.stderr, flush=True)
    if cfg.trajectory:
        zo.recorder = TrajectoryRecorder(run_dir.path / FILENAME, trajectory_header(setup, zo), zo.stepper)
    recorder = zo.recorder

    def dev_fn() -> float:
        if not writer:   # only rank 0 keeps the best weights; the others would evaluate for nothing
            return 0.0
        metric = evaluate(scorer, enc_dev, data.dev, task, cfg.eval_batch_size, cfg.progress,
                          decision=cfg.decision)[task.metric]
        settle()   # the best weights are saved from the CPU copies next
        return metric

    def settle() -> None:   # offload: run the passes still queued for blocks in CPU memory
        if offloader is not None:
            offloader.settle()

    def on_save(step: int, state: dict) -> None:
        settle()
        if recorder is not None and writer:
            recorder.save(step, state)

    def on_rollback(step: int) -> None:   # the trajectory keeps only the path the run goes on from
        if recorder is not None and recorder.trajectory is not None:
            del recorder.trajectory.records[step:]

    # several ranks cannot roll back in step (each reads its own view of the run directory)
    guard = Guard(cfg.guard_factor, cfg.guard_max_rollbacks) if cfg.guard and par is None else None
    state = train_loop(run_dir, steps=cfg.steps, eval_every=cfg.eval_every, save_every=cfg.save_every,
                       step_fn=zo.step_fn, dev_fn=dev_fn, trainable=zo.trainable, resume=resume,
                       progress=cfg.progress, writer=writer, metric_name=task.metric,
                       on_save=on_save,
                       on_resume=recorder.resume if recorder else None, save_weights=cfg.save_weights,
                       report_to=cfg.report_to, export=hf_export(model, setup.loaded.tokenizer, setup.loaded),
                       guard=guard, on_rollback=on_rollback,
                       reference=guard_reference(cfg, len(enc_train), measure) if guard else None)
    settle()
    if not writer:
        return {"rank": par.rank}
    return finish(setup, run_dir, scorer, zo.trainable, state)


def run_lp_mezo(setup: Setup, run_dir, resume: bool = False) -> dict:
    """LP-MeZO, LP-FT with MeZO in FT's place: the linear probe (features from forward passes, a
    convex fit) written into the LM head's label-word rows, then MeZO from there. No backward
    pass anywhere, so memory stays at inference's plus the untied head.

    Its trajectory starts from the probed model, which the base model alone does not give, so
    ``zoft replay`` refuses it (by the method its header names); resume reloads the saved probe."""
    probe_train_acc = install_probe(setup, run_dir, resume, what="LP-MeZO")
    result = run(setup, run_dir, resume)
    result["probe_train_acc"] = probe_train_acc
    run_dir.write_json("eval.json", result)
    return result


register_method(Method("mezo", run, load=load_trained_lm, modes=MODES, trains=True, parallel=True, trajectory=True))
register_method(Method("lp-mezo", run_lp_mezo, load=load_lp_ft, modes=MODES, trains=True))

"""MeZO in transformers' ``Trainer``: :class:`ZOTrainer`, through Trainer's public hooks.

    trainer = ZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6), train_dataset=ds,
                        zo_options={"eps": 1e-3})
    trainer.train()                                    # or train(resume_from_checkpoint="out/checkpoint-100")

The hooks it overrides, and nothing of Trainer's loop:

* ``create_optimizer``: a :class:`zoft.optim.MeZO` over the trained tensors with
  ``args.learning_rate`` and ``args.seed``; with ``args.weight_decay`` the two groups Trainer
  makes (decay / no decay by name), else one group. ``zo_options`` go to MeZO (estimator, eps, ...).
* ``training_step``: one whole ZO step on the batch, its loss from ``compute_loss`` (so
  ``compute_loss_func`` and subclasses' losses apply), the model in eval mode (no dropout: both
  probes must see one function). Trainer's own ``optimizer.step()`` right after finds no closure
  and does nothing (``ignore_step_without_closure``); the LR scheduler, logging, ``report_to``,
  evaluation and checkpoints are Trainer's. The step count, seed and any momentum/Adam state are in
  ``optimizer.pt``, so ``resume_from_checkpoint`` continues on the same directions.
* a callback that settles a fused step (``zo_options={"fused": True}``) before Trainer saves,
  evaluates or stops, so checkpoints and the final model hold θ.

:class:`ZOTrainerMixin` adds the same to any Trainer subclass, e.g. TRL's ``SFTTrainer``:
``class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer): pass``.
"""
from __future__ import annotations

import warnings

import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformers import Trainer, TrainerCallback

from zoft.errors import ZoftError
from zoft.optim import MeZO

# the transformers versions its tests passed on (5.0.0 and 5.24.0); pyproject's `hf` extra declares the same
TESTED_TRANSFORMERS = ">=5.0,<5.25"

if transformers.__version__ not in SpecifierSet(TESTED_TRANSFORMERS, prereleases=True):
    warnings.warn(f"zoft.integrations.hf is tested with transformers{TESTED_TRANSFORMERS}; "
                  f"this is {transformers.__version__}", stacklevel=2)

__all__ = ["ZOTrainer", "ZOTrainerMixin", "TESTED_TRANSFORMERS"]


class ZOTrainerMixin:
    """The ZO hooks for a ``transformers.Trainer`` subclass (put it first in the bases)."""

    def __init__(self, *args, zo_options: dict | None = None, **kwargs) -> None:
        self.zo_options = dict(zo_options or {})
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ZoftError("ZOTrainer: gradient_accumulation_steps must be 1 (each ZO step probes one batch; "
                            "raise per_device_train_batch_size instead)")
        if self.args.fp16:
            raise ZoftError("ZOTrainer: fp16 loss scaling needs gradients; use bf16=True or fp32")
        self.add_callback(_SettleBeforeReads(self))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if self.args.weight_decay:
                decay = set(self.get_decay_parameter_names(model))
                groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                          {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
                groups = [g for g in groups if g["params"]]
            else:   # one group: zoft's own stepper, the fused one included where it applies
                groups = [{"params": [p for _, p in named]}]
            options = {"seed": self.args.seed, **self.zo_options}
            self.optimizer = MeZO(groups, lr=self.args.learning_rate, ignore_step_without_closure=True, **options)
        elif isinstance(self.optimizer, MeZO):   # the user's, through Trainer(optimizers=(MeZO(...), None))
            self.optimizer.ignore_step_without_closure = True   # Trainer's step() comes after ours
        return self.optimizer

    @property
    def mezo(self) -> MeZO:
        """The MeZO optimizer, unwrapped from accelerate's ``AcceleratedOptimizer``."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(optimizer, MeZO):
            raise ZoftError(f"ZOTrainer trains with zoft.optim.MeZO, not {type(optimizer).__name__}")
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.eval()   # no dropout: L(θ+εz) and L(θ−εz) must be the same function of θ

        def loss() -> torch.Tensor:   # called under no_grad, once per probe
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch).mean()

        return self.mezo.step(loss).to(self.args.device)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:   # a training log: ZO makes no .grad, so Trainer's grad_norm (0) says nothing
            logs.pop("grad_norm", None)
            estimate = self.mezo.last_estimate
            if estimate is not None:   # the last step's mean g, as `zoft train` logs it
                logs["projected_grad"] = sum(g for _, g in estimate.directions) / len(estimate.directions)
        super().log(logs, *args, **kwargs)


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with MeZO (see the module docstring)."""


class _SettleBeforeReads(TrainerCallback):
    """Between fused steps the weights hold θ + εz: remove it before Trainer reads them."""

    def __init__(self, trainer: ZOTrainerMixin) -> None:
        self.trainer = trainer

    def _settle_if_read(self, control) -> None:
        if control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer.mezo.settle()

    def on_step_end(self, args, state, control, **kwargs):
        self._settle_if_read(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._settle_if_read(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.mezo.settle()

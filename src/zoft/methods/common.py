"""Set-up and evaluation shared by every method: one task, one model, one eval path."""
from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zoft.adapters import apply_mode
from zoft.config import ZO_METHODS, Config
from zoft.errors import ZoftError
from zoft.guard import REFERENCE_BATCHES
from zoft.lm import CandidateScorer, Encoded, batches, resolve_compute_dtype
from zoft.models import LoadedModel, load_model
from zoft.runs import owned_tensor
from zoft.tasks import Task, TaskData, compute_metric, load_task, using_data_dir
from zoft.tasks.decision import decide, requires_scale
from zoft.training import batch_indices


@dataclass
class Setup:
    """A task's sampled data and a loaded model, ready to score."""

    cfg: Config
    task: Task
    data: TaskData
    loaded: LoadedModel | None   # None for a method that loads its own model (bert-cls's encoder)

    def with_mode(self, model=None):
        """The model (default: the loaded one) made trainable in the config's mode (full/LoRA/prefix)."""
        cfg, model = self.cfg, self.loaded.model if model is None else model
        # the adapter init is a pure function of the seed (not of whatever ran before), so a
        # trajectory replay or a resume rebuilds the very same LoRA/prefix starting point
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            return apply_mode(model, cfg.mode,
                              is_masked_lm=self.loaded.is_masked_lm, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_targets=cfg.lora_targets, num_virtual_tokens=cfg.num_virtual_tokens)

    def scorer(self, model=None) -> CandidateScorer:
        return CandidateScorer(model if model is not None else self.loaded.model, self.loaded.tokenizer,
                               self.task.kind, self.loaded.is_masked_lm, self.cfg.max_length,
                               self.task.target_delimiter, compute_dtype=self.compute_dtype,
                               shared_prefix=self.shared_prefix)

    @property
    def shared_prefix(self) -> str:
        """The config's shared_prefix, "off" under offload or device_map: they stream or split the
        layers per forward, and a shared header costs a second forward's worth of moves."""
        cfg = self.cfg
        if cfg.offload or cfg.device_map:
            if cfg.shared_prefix == "on":
                raise ZoftError("shared_prefix=on does not combine with offload or device_map; use auto or off")
            return "off"
        return cfg.shared_prefix

    @property
    def compute_dtype(self) -> str | None:
        """The config's compute_dtype with "auto" resolved for the loaded model (what eval.json records).

        "auto" keeps fp32 compute for ZO methods in LoRA mode, where bf16 would be faster: with LoRA's
        B = 0 at the start, a perturbation moves the loss by less than bf16's rounding of it.
        `bench/eps_sweep.py` (SmolLM2-135M, SST-2, LoRA r 8) measured MeZO's difference against
        autograd's directional derivative: with bf16 compute it was off by 3.4x its size at ε 1e-3 and
        by 0.62x at 1e-2 (signs right 3 and 6 times of 8), with fp32 compute by 0.000 and 0.017. In
        full mode bf16 is off by 0.32x at 1e-3, which MeZO's own noise dwarfs, so there auto stays bf16.
        """
        if not self.loaded:
            return None
        resolved = resolve_compute_dtype(self.cfg.compute_dtype, self.loaded.model)
        if (resolved == "bf16" and self.cfg.compute_dtype == "auto" and self.cfg.method in ZO_METHODS
                and self.cfg.mode == "lora"):
            return "fp32"
        return resolved

    def pin_compute_dtype(self) -> None:
        """Put auto's choice into the config before config.yaml is written, so a resume keeps it
        even if auto's rule changes (it did: ZO in LoRA mode went from bf16 to fp32)."""
        if self.cfg.compute_dtype == "auto" and self.compute_dtype:
            self.cfg.compute_dtype = self.compute_dtype


def prepare(cfg: Config, loaded: LoadedModel | None = None, load_lm: bool = True) -> Setup:
    """Load the task data and the model a config names (the model can be passed in, e.g. by tests).

    ``load_lm=False`` skips the LM for a method that brings its own model (the registry's
    ``Method.loads_lm``: bert-cls trains an encoder).
    """
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        set_threads(cfg.threads)
    with using_data_dir(cfg.data_dir):   # where builtin tasks (and relative dataset paths) find their files
        task = load_task(cfg.task)
        requires_scale(cfg.decision, task)
        data = task.get_data(n_train=cfg.n_train, n_dev=cfg.n_dev, n_eval=cfg.n_eval,
                             seed=cfg.data_seed, k_per_class=cfg.k_per_class)
    if loaded is None and load_lm:
        loaded = load_model(cfg.model, dtype=cfg.dtype, device="cpu" if cfg.offload or cfg.device_map else cfg.device,
                            trust_remote_code=cfg.trust_remote_code)
        if cfg.device_map:   # layers over several GPUs; each parameter is perturbed where it lives
            from zoft.placement import place
            loaded.model = place(loaded.model, cfg.device_map)
    return Setup(cfg, task, data, loaded)


REFERENCE_SEED_OFFSET = 1_000_003   # the reference batches' shuffle seed is the run's seed plus this


def guard_reference(cfg: Config, n_train: int, loss_on: Callable[[list[int]], float]) -> Callable[[], float]:
    """The divergence guard's reference (:mod:`zoft.guard`): the mean of ``loss_on`` over
    ``REFERENCE_BATCHES`` fixed training batches of the run's batch size, drawn with their own seed
    so that they are not the batches of any step near the alarm."""
    fixed = [batch_indices(n_train, cfg.batch_size, cfg.seed + REFERENCE_SEED_OFFSET, p) for p in range(REFERENCE_BATCHES)]
    return lambda: sum(loss_on(idx) for idx in fixed) / len(fixed)


def set_threads(n: int) -> None:
    """``threads=N``: torch's intra-op CPU threads, and its inter-op pool where that is still possible."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:   # allowed once per process, before any inter-op work (e.g. the second run of a compare)
        pass


def predictions(scorer: CandidateScorer, enc: Encoded, task: Task, batch_size: int, progress: bool = False,
                desc: str = "eval", decision: str = "argmax") -> list:
    """Choice indices (classification, multiple choice) or generated strings (generation)."""
    return predictions_with_probabilities(scorer, enc, task, batch_size, progress, desc, decision)[0]


@torch.no_grad()
def predictions_with_probabilities(scorer: CandidateScorer, enc: Encoded, task: Task, batch_size: int,
                                   progress: bool = False, desc: str = "eval", decision: str = "argmax"
                                   ) -> tuple[list, list[list[float]] | None]:
    """:func:`predictions`, and for classification each example's probability of each candidate, else
    None. A classification's prediction is the ``decision`` rule's level (:mod:`zoft.tasks.decision`)."""
    was_training = scorer.model.training
    scorer.model.eval()
    # Batch examples of similar length together: padding is wasted compute on a CPU.
    order = sorted(range(len(enc)), key=lambda i: len(enc.context_ids[i]))
    out: list = [None] * len(enc)
    probabilities: list[list[float]] = [[]] * len(enc)
    bar = tqdm(total=len(order), disable=not progress, desc=desc, unit="ex", leave=False, dynamic_ncols=True)
    with scorer.frozen_weights():   # a header's keys and values serve every batch of this pass
        for chunk in batches(len(order), batch_size):
            idx = [order[i] for i in chunk]
            if task.kind == "generation":
                gen = task.generation_kwargs or {}
                preds = scorer.generate(enc, idx, max_new_tokens=gen.get("max_gen_toks", 32),
                                        until=tuple(gen.get("until", ["\n"])))
            elif task.kind == "classification":   # the decision rule's level, with the probabilities behind it
                probs = scorer.candidate_logprobs(enc, idx)[0].double().softmax(-1)
                preds = decide(probs, decision)
                for i, q in zip(idx, probs.tolist()):
                    probabilities[i] = q
            else:
                preds = scorer.predict(enc, idx)
            for i, p in zip(idx, preds):
                out[i] = p
            bar.update(len(idx))
    bar.close()
    scorer.model.train(was_training)
    return out, (probabilities if task.kind == "classification" else None)


def evaluate(scorer: CandidateScorer, enc: Encoded, examples, task: Task, batch_size: int,
             progress: bool = False, label: str | None = None, decision: str = "argmax") -> dict[str, float]:
    """Every metric of the task on a split, e.g. ``{"acc": 0.81}``."""
    return evaluate_with_predictions(scorer, enc, examples, task, batch_size, progress, label, decision)[0]


def evaluation_line(label: str, metrics: dict[str, float], n: int, seconds: float) -> str:
    """``eval: acc 0.8120 (500 examples, 12.3 s)``: what progress=false prints for an evaluation."""
    values = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    return f"{label}: {values} ({n} examples, {seconds:.1f} s)"


def evaluate_with_predictions(scorer: CandidateScorer, enc: Encoded, examples, task: Task, batch_size: int,
                              progress: bool = False, label: str | None = None, decision: str = "argmax"
                              ) -> tuple[dict[str, float], dict[str, list]]:
    """Metrics plus what eval.json keeps for a report (:func:`metrics_and_outputs`), and for
    classification each prediction's confidence (the probability of the predicted level) and every
    candidate's probability.

    ``progress`` shows a bar over the examples; without it, a ``label`` prints one summary line
    (:func:`evaluation_line`) to stderr, so a long quiet evaluation still says what it found.
    """
    start = time.perf_counter()
    preds, probabilities = predictions_with_probabilities(scorer, enc, task, batch_size, progress,
                                                          desc=label or "eval", decision=decision)
    metrics, outputs = metrics_and_outputs(task, preds, examples, probabilities)
    if label and not progress:
        print(evaluation_line(label, metrics, len(examples), time.perf_counter() - start), file=sys.stderr, flush=True)
    return metrics, outputs


def metrics_and_outputs(task: Task, preds: list, examples, probabilities: list[list[float]] | None = None
                        ) -> tuple[dict[str, float], dict[str, list]]:
    """Every metric of the task, and what eval.json keeps for a report: predictions, gold
    targets and the task's per-response columns (ids, second rater, subgroups); given each
    example's level ``probabilities``, also those and each prediction's confidence (the probability
    of the chosen level: for QWK against coverage, :mod:`zoft.tasks.rubric.confidence`)."""
    metrics = {name: compute_metric(name, preds, examples) for name in task.metrics}
    targets = [ex.target if ex.target is not None else ex.answers for ex in examples]
    outputs = {"predictions": preds, "targets": targets, **task.response_columns(examples)}
    if probabilities is not None:
        outputs["confidences"] = [round(float(p[c]), 6) for p, c in zip(probabilities, preds)]
        outputs["probabilities"] = [[round(float(q), 6) for q in p] for p in probabilities]
    return metrics, outputs


BASE_MODEL_FILE = "zoft_base_model.json"   # in an adapter folder: zoft's name of the base and where it loads from


def hf_export(model, tokenizer, base: LoadedModel | None = None) -> Callable[[Path], None]:
    """``export(folder)``: ``model`` as HF loads it, for ``best/``.

    A peft model (LoRA, prefix) writes its adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``), whose ``base_model_name_or_path`` is the folder the base
    loads from (a builtin GGUF model's dequantised cache entry), so ``PeftModel.from_pretrained``
    finds it; zoft's own name of the base goes to ``zoft_base_model.json``. Any other model writes
    itself whole (``config.json`` + ``model.safetensors``) for ``AutoModel*.from_pretrained``.
    The tokenizer goes with either.
    """
    from peft import PeftModel

    def export(folder: Path) -> None:
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # a "Writing model shards" bar at every new best is noise
        try:
            with warnings.catch_warnings():   # transformers' deprecation notices on peft's save path, every save
                warnings.simplefilter("ignore", FutureWarning)
                save(folder)
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    def save(folder: Path) -> None:
        if isinstance(model, PeftModel):
            if base is not None:
                for adapter in model.peft_config.values():
                    adapter.base_model_name_or_path = base.source or base.name
                (folder / BASE_MODEL_FILE).write_text(json.dumps(
                    {"name": base.name, "identity": base.identity, "source": base.source}, indent=1))
            # False: no full embedding matrices (zoft never resizes the vocabulary), and no hub
            # lookup of the base's config, which peft's "auto" would try
            model.save_pretrained(str(folder), save_embedding_layers=False)
        else:   # tensors that are views of one flat buffer (flat_params) are copied: safetensors refuses them
            state = {k: owned_tensor(v.detach()) for k, v in model.state_dict().items()}
            model.save_pretrained(str(folder), state_dict=state)
        tokenizer.save_pretrained(str(folder))
    return export


def best_or_last_weights(run_dir):
    """``best/`` if the run kept one, else its last ``checkpoint-N/``."""
    from zoft.errors import ZoftError
    best = run_dir.path / "best"
    weights = best if best.exists() else (run_dir.checkpoints() or [None])[-1]
    if weights is None:
        raise ZoftError(f"{run_dir.path}: run has no trained weights (no best/ or checkpoint-N/)")
    return weights


def load_trained_lm(setup: Setup, run_dir, model=None):
    """The scorer of a run that trained the LM (MeZO, FT): the model in its mode, with its best
    (else last) trained tensors loaded."""
    from zoft.adapters import named_trainable
    from zoft.training import Trainable

    weights = best_or_last_weights(run_dir)
    model = setup.with_mode(setup.loaded.model if model is None else model)
    Trainable(named_trainable(model)).load(run_dir.load_checkpoint(weights)[0])
    model.eval()
    return setup.scorer(model)


def finish(setup: Setup, run_dir, scorer, trainable, state, model_name: str | None = None) -> dict:
    """Load the best dev weights (if asked), evaluate on the eval split, write eval.json and the plot."""
    cfg, task, data = setup.cfg, setup.task, setup.data
    if cfg.load_best and (run_dir.path / "best").exists():
        trainable.load(run_dir.load_checkpoint(run_dir.path / "best")[0])
    metrics, outputs = evaluate_with_predictions(scorer, scorer.encode(data.eval), data.eval, task,
                                                 cfg.eval_batch_size, cfg.progress, label="eval", decision=cfg.decision)
    return write_result(setup, run_dir, state, metrics, outputs, model_name)


def write_result(setup: Setup, run_dir, state, metrics: dict, outputs: dict, model_name: str | None = None) -> dict:
    """eval.json (and the training curve) of a trained run."""
    cfg, task, data = setup.cfg, setup.task, setup.data
    result = {
        "method": cfg.method, "mode": cfg.mode, "task": task.name, "model": model_name or cfg.model,
        "metric": task.metric, "eval": metrics, "compute_dtype": setup.compute_dtype,
        "best_dev": state.best_metric, "best_step": state.best_step, "steps": cfg.steps,
        "n_train": len(data.train), "n_dev": len(data.dev), "n_eval": len(data.eval),
        "train_seconds": round(state.elapsed, 1), "eval_outputs": outputs,
    }
    run_dir.write_json("eval.json", result)
    run_dir.plot(task.metric)
    return result


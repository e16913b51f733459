"""Linear probing: logistic regression on the frozen LM's features at the scoring position.

The features are the last hidden state where the label word is predicted
(:meth:`zoft.lm.CandidateScorer.features`), standardised per dimension, and the probe
is scikit-learn's L2-regularised logistic regression (``C = cfg.lp_c``). Predictions
are class indices, scored with the task's own metrics, so LP sits in the same table as
zero-shot, ICL, FT and MeZO. Classification tasks only: the probe needs a fixed label set.

A causal LM's run keeps its probe as LM-head rows (``probe_head.safetensors``, the form LP-FT
starts from: :func:`probe_to_head`), so ``zoft eval``, ``score``, ``serve`` and an ensemble load
the probe with the LM. The label-normalised probabilities of that head are the probe's own.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from zoft.atomic import atomic_write_bytes
from zoft.errors import ZoftError
from zoft.tasks.decision import decide
from zoft.lm import CandidateScorer, Encoded, batches
from zoft.adapters import MODES
from zoft.methods.common import Setup, evaluation_line, metrics_and_outputs
from zoft.methods.registry import Method, load_lm_as_is, register_method

MAX_ITER = 5000   # lbfgs on a few thousand standardised features converges well before this
PROBE_HEAD_FILE = "probe_head.safetensors"   # the probe as LM-head rows: what LP, LP-FT and LP-MeZO runs keep


def require_classification(task, method: str = "LP") -> None:
    if task.kind != "classification":
        raise ZoftError(f"{method} needs a classification task (fixed label words); "
                        f"task '{task.name}' is {task.kind}")


@torch.no_grad()
def extract_features(scorer: CandidateScorer, enc: Encoded, batch_size: int, progress: bool = False,
                     desc: str = "features") -> np.ndarray:
    """(N, H) float64 features of a split, in batches, with the model in eval mode."""
    was_training = scorer.model.training
    scorer.model.eval()
    chunks = batches(len(enc), batch_size)
    try:
        out = [scorer.features(enc, idx).cpu()
               for idx in tqdm(chunks, total=-(-len(enc) // batch_size), desc=desc, unit="batch",
                               disable=not progress, leave=False, dynamic_ncols=True)]
    finally:
        scorer.model.train(was_training)
    return torch.cat(out).double().numpy()


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float, seed: int = 0,
              with_mean: bool = True) -> Pipeline:
    """StandardScaler → LogisticRegression(C=c), fitted on (N, H) features and (N,) class indices."""
    if len(np.unique(labels)) < 2:
        raise ZoftError(f"the training sample has one class only ({int(labels[0])}); a probe needs two or more")
    probe = Pipeline([("scale", StandardScaler(with_mean=with_mean)),
                      ("logreg", LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed))])
    return probe.fit(features, labels)


def probe_to_head(probe, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head rows (C, H) and biases (C,) whose logits on raw features equal the probe's, per class.

    The scaler folds in: ``((h − μ)/σ)·w + b = h·(w/σ) + (b − μ·(w/σ))``.
    """
    scaler, logreg = probe.named_steps["scale"], probe.named_steps["logreg"]
    classes = [int(c) for c in logreg.classes_]
    if sorted(classes) != list(range(n_classes)):
        missing = sorted(set(range(n_classes)) - set(classes))
        raise ZoftError(f"the training sample has no example of class(es) {missing}; "
                        "the probe cannot give them a head row (use more training examples or k_per_class)")
    coef = np.asarray(logreg.coef_, dtype=np.float64)
    intercept = np.asarray(logreg.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:   # binary: one vector scores class 1 against class 0
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    rows, bias = np.zeros((n_classes, coef.shape[1])), np.zeros(n_classes)
    rows[classes], bias[classes] = coef, intercept
    scale = np.asarray(scaler.scale_ if scaler.scale_ is not None else np.ones(coef.shape[1]))
    mean = np.asarray(scaler.mean_ if scaler.mean_ is not None else np.zeros(coef.shape[1]))
    rows = rows / scale
    bias = bias - rows @ mean
    return torch.from_numpy(rows), torch.from_numpy(bias)


@torch.no_grad()
def install_head(model, label_ids: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor) -> None:
    """Write probe rows and biases into the output head, untying it from the input embeddings first."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or not hasattr(head, "bias"):
        raise ZoftError("LP-FT needs a model whose output head is a linear layer over the vocabulary")
    embeddings = model.get_input_embeddings()
    if embeddings is not None and head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    if head.bias is None:   # a plain LM head has no bias: add a zero one for the probe's intercepts
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0], dtype=head.weight.dtype,
                                                   device=head.weight.device))
    ids = label_ids.to(head.weight.device)
    head.weight[ids] = rows.to(head.weight)
    head.bias[ids] = bias.to(head.bias)


def save_probe_head(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))   # a few rows: bytes are cheap


def restore_probe_head(model, run_path) -> bool:
    """Re-install a finished LP-FT run's probe head (untie, add bias) on a freshly loaded model.

    Call before applying the mode and loading the run's trained tensors: in full mode those
    then overwrite the head with its fine-tuned values; in LoRA mode the head stays frozen
    at the probe, which this restores. Returns False if the run has no probe head file.
    """
    path = Path(run_path) / PROBE_HEAD_FILE
    if not path.is_file():
        return False
    saved = load_file(str(path))
    install_head(model, saved["label_ids"], saved["rows"], saved["bias"])
    return True


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    """Fit the probe on the train sample; report dev and eval metrics (eval.json, method "lp").

    Nothing is checkpointed: extracting features and fitting take seconds, so a resumed
    run simply starts over.
    """
    cfg, task, data = setup.cfg, setup.task, setup.data
    require_classification(task)
    start = time.perf_counter()
    model = setup.loaded.model
    model.eval()
    scorer = setup.scorer(model)
    enc_train = scorer.encode(data.train)
    x_train = extract_features(scorer, enc_train, cfg.eval_batch_size, cfg.progress, "train")
    y_train = np.array([ex.target for ex in data.train])
    probe = fit_probe(x_train, y_train, cfg.lp_c, cfg.seed)
    not_kept = None   # why the probe is not kept as head rows, or None
    if scorer.is_masked_lm or enc_train.label_ids is None:
        not_kept = "its rows need a causal LM whose label words are one scored token each"
    else:
        try:
            rows, bias = probe_to_head(probe, len(enc_train.label_ids))
            save_probe_head(run_dir.path / PROBE_HEAD_FILE,
                            {"rows": rows.float(), "bias": bias.float(), "label_ids": enc_train.label_ids})
        except ZoftError as e:   # a class missing from the training sample has no row
            not_kept = str(e)
    train_seconds = time.perf_counter() - start

    splits, outputs = {}, {}
    for name, examples in (("dev", data.dev), ("eval", data.eval)):
        if not examples:
            splits[name] = {}
            continue
        split_start = time.perf_counter()
        x = extract_features(scorer, scorer.encode(examples), cfg.eval_batch_size, cfg.progress, name)
        # the eval split's predictions are kept, as every method keeps them, for zoft report
        # every candidate's probability (0 for a class the training sample lacked), then the decision rule
        probs = np.zeros((len(examples), len(task.label_words)))
        probs[:, probe.classes_] = probe.predict_proba(x)
        predicted = decide(torch.from_numpy(probs), cfg.decision)
        splits[name], outputs = metrics_and_outputs(task, predicted, examples, probs.tolist())
        if not cfg.progress:
            print(evaluation_line(name, splits[name], len(examples), time.perf_counter() - split_start),
                  file=sys.stderr, flush=True)

    result = {
        "method": "lp", "task": task.name, "model": cfg.model, "metric": task.metric,
        "eval": splits["eval"], "dev": splits["dev"], "lp_c": cfg.lp_c,
        "train_acc": float((probe.predict(x_train) == y_train).mean()),
        "n_train": len(data.train), "n_dev": len(data.dev), "n_eval": len(data.eval),
        "train_seconds": round(train_seconds, 1), "compute_dtype": scorer.compute_dtype,
        "probe_head": not_kept is None, "eval_outputs": outputs,
    }
    if not_kept is not None:
        print(f"zoft: lp: the probe is not kept as LM-head rows ({not_kept}); a loaded run scores with "
              "the base LM", file=sys.stderr)
    run_dir.write_json("eval.json", result)
    return result


def load(setup: Setup, run_dir):
    """A finished LP run: the base LM with the probe in its head (older runs, and masked LMs: the base LM)."""
    if not restore_probe_head(setup.loaded.model, run_dir.path):
        print(f"zoft: lp: {run_dir.path} keeps no {PROBE_HEAD_FILE}; scoring with the base LM, as zero-shot does",
              file=sys.stderr)
    return load_lm_as_is(setup, run_dir)


register_method(Method("lp", run, load=load, modes=MODES))

__all__ = ["run", "load", "extract_features", "fit_probe", "require_classification", "probe_to_head", "install_head",
           "save_probe_head", "restore_probe_head", "PROBE_HEAD_FILE"]

"""Linear probing: logistic regression on the frozen LM's features at the scoring position.

The features are the last hidden state where the label word is predicted
(:meth:`zoft.lm.CandidateScorer.features`), standardised per dimension, and the probe
is scikit-learn's L2-regularised logistic regression (``C = cfg.lp_c``). Predictions
are class indices, scored with the task's own metrics, so LP sits in the same table as
zero-shot, ICL, FT and MeZO. Classification tasks only: the probe needs a fixed label set.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from zoft.errors import ZoftError
from zoft.lm import CandidateScorer, Encoded, batches
from zoft.adapters import MODES
from zoft.methods.common import Setup, evaluation_line, metrics_and_outputs
from zoft.methods.registry import Method, register_method

MAX_ITER = 5000   # lbfgs on a few thousand standardised features converges well before this


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
    x_train = extract_features(scorer, scorer.encode(data.train), cfg.eval_batch_size, cfg.progress, "train")
    y_train = np.array([ex.target for ex in data.train])
    probe = fit_probe(x_train, y_train, cfg.lp_c, cfg.seed)
    train_seconds = time.perf_counter() - start

    splits, outputs = {}, {}
    for name, examples in (("dev", data.dev), ("eval", data.eval)):
        if not examples:
            splits[name] = {}
            continue
        split_start = time.perf_counter()
        x = extract_features(scorer, scorer.encode(examples), cfg.eval_batch_size, cfg.progress, name)
        # the eval split's predictions are kept, as every method keeps them, for zoft report
        splits[name], outputs = metrics_and_outputs(task, [int(p) for p in probe.predict(x)], examples)
        if not cfg.progress:
            print(evaluation_line(name, splits[name], len(examples), time.perf_counter() - split_start),
                  file=sys.stderr, flush=True)

    result = {
        "method": "lp", "task": task.name, "model": cfg.model, "metric": task.metric,
        "eval": splits["eval"], "dev": splits["dev"], "lp_c": cfg.lp_c,
        "train_acc": float((probe.predict(x_train) == y_train).mean()),
        "n_train": len(data.train), "n_dev": len(data.dev), "n_eval": len(data.eval),
        "train_seconds": round(train_seconds, 1), "compute_dtype": scorer.compute_dtype,
        "eval_outputs": outputs,
    }
    run_dir.write_json("eval.json", result)
    return result


# the probe itself is not saved: a loaded LP run scores with the base LM (as zero-shot does)
register_method(Method("lp", run, modes=MODES))

__all__ = ["run", "extract_features", "fit_probe", "require_classification"]

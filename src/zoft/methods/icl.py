"""In-context learning: k solved training examples prepended to each eval context.

Demonstrations are drawn from the training sample with a fixed seed, the same for every
eval example (as in the MeZO paper's ICL baseline). When the prompt does not fit in
``max_length``, the scorer truncates from the left, dropping the oldest demonstrations
first.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from zoft.adapters import MODES
from zoft.methods.common import Setup, evaluate, evaluate_with_predictions
from zoft.methods.registry import Method, register_method


def with_demonstrations(examples, demos, delimiter: str, separator: str = "\n\n") -> list:
    """Copies of ``examples`` whose context starts with the solved demonstrations."""
    prefix = "".join(d.context + delimiter + d.answers[0] + separator for d in demos)
    return [dataclasses.replace(ex, context=prefix + ex.context) for ex in examples]


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    cfg, task, data = setup.cfg, setup.task, setup.data
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(data.train), size=min(cfg.icl_k, len(data.train)), replace=False)
    demos = [data.train[i] for i in chosen]
    scorer = setup.scorer()
    setup.loaded.model.eval()
    evals = {}
    prompted = with_demonstrations(data.eval, demos, task.target_delimiter)
    evals["eval"], outputs = evaluate_with_predictions(scorer, scorer.encode(prompted), prompted, task,
                                                       cfg.eval_batch_size, cfg.progress, label="eval",
                                                       decision=cfg.decision)
    prompted = with_demonstrations(data.dev, demos, task.target_delimiter)
    evals["dev"] = evaluate(scorer, scorer.encode(prompted), prompted, task, cfg.eval_batch_size,
                            cfg.progress, label="dev", decision=cfg.decision)
    result = {"method": "icl", "k": len(demos), "task": task.name, "model": cfg.model,
              "metric": task.metric, **evals, "n_eval": len(data.eval), "compute_dtype": scorer.compute_dtype,
              "eval_outputs": outputs}
    run_dir.write_json("eval.json", result)
    return result


register_method(Method("icl", run, modes=MODES))

"""Zero-shot: score the candidates of the eval split with the pretrained model as is."""
from __future__ import annotations

from zoft.adapters import MODES
from zoft.methods.common import Setup, evaluate, evaluate_with_predictions
from zoft.methods.registry import Method, register_method


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    cfg, task, data = setup.cfg, setup.task, setup.data
    scorer = setup.scorer()
    setup.loaded.model.eval()
    metrics, outputs = evaluate_with_predictions(scorer, scorer.encode(data.eval), data.eval, task,
                                                 cfg.eval_batch_size, cfg.progress, label="eval", decision=cfg.decision)
    result = {"method": "zero-shot", "task": task.name, "model": cfg.model, "metric": task.metric,
              "eval": metrics, "dev": evaluate(scorer, scorer.encode(data.dev), data.dev, task, cfg.eval_batch_size,
                                                          cfg.progress, label="dev", decision=cfg.decision),
              "n_eval": len(data.eval), "compute_dtype": scorer.compute_dtype, "eval_outputs": outputs}
    run_dir.write_json("eval.json", result)
    return result


register_method(Method("zero-shot", run, modes=MODES))

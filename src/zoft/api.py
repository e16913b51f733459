"""The public Python API: ``zoft.train(config)`` and ``zoft.evaluate(...)``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from zoft.config import Config, load_config
from zoft.methods import load_run, method_for
from zoft.methods.common import prepare
from zoft.runs import RunDir


def _as_config(config: Config | dict | str | Path | None, overrides: dict[str, Any] | None) -> Config:
    if isinstance(config, Config):
        return load_config(overrides={**config.to_dict(), **(overrides or {})})
    if isinstance(config, dict):
        return load_config(overrides={**config, **(overrides or {})})
    return load_config(config, overrides or {})


def start_line(verb: str, cfg: Config, where: Path, model: str | None = None) -> str:
    """One line naming what a run uses, so a forgotten ``task=`` or a wrong model shows at once."""
    return (f"zoft: {verb}: task {cfg.task}, model {model or cfg.model}, method {cfg.method}, "
            f"mode {cfg.mode}, run directory {where}")


def _announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train(config: Config | dict | str | Path | None = None, resume: str | Path | None = None,
          loaded=None, **overrides) -> dict:
    """Run one method on one task and return its results (also written to the run dir).

    Args:
        config: a Config, a dict of options, or a path to a YAML config.
        resume: a run directory to continue from its last checkpoint (its config is reused).
        loaded: an already loaded model (``zoft.models.LoadedModel``), to skip loading.
        **overrides: options that take precedence over ``config``.

    Example:
        >>> zoft.train(method="mezo", task="sst2", model="smollm2-135m", steps=200, lr=1e-6)
    """
    if resume is not None:
        run_dir = RunDir(resume)
        # a run directory is data people send each other: remote code runs only on the caller's own word
        run_dir.read_config()   # one-line errors for a missing, broken or non-mapping config.yaml
        cfg = load_config(run_dir.path / "config.yaml",
                          {"trust_remote_code": False, "overwrite_output_dir": False, **overrides})
    else:
        cfg = _as_config(config, overrides)
        run_dir = RunDir(cfg.resolved_output_dir())
        cfg.output_dir = str(run_dir.path)
    method = method_for(cfg)         # an unknown method, or a mode or option it lacks: one line, now
    par = None
    if cfg.parallel != "none":   # under torchrun: join the group; only rank 0 writes the run directory
        from zoft import distributed
        par = distributed.from_config(cfg)
        cfg.output_dir = par.broadcast_text(cfg.output_dir)
        run_dir = RunDir(cfg.output_dir) if par.is_writer else distributed.ReadOnlyRunDir(cfg.output_dir)
    writes = not par or par.is_writer
    if writes and resume is None:    # before the model loads: a bad output_dir should not cost minutes
        run_dir.check_usable(overwrite=cfg.overwrite_output_dir)
    setup = prepare(cfg, loaded, load_lm=method.loads_lm)   # bad data or model fails here, before any write
    if writes and resume is None:
        setup.pin_compute_dtype()    # config.yaml names what compute_dtype=auto chose here
        run_dir.clear()              # the earlier run's entries (check_usable refused unless overwrite)
        run_dir.write_config(cfg.to_dict())
    elif writes:
        run_dir.sweep()              # temps of writes a kill cut short
    if writes:
        model = cfg.model if method.loads_lm else cfg.encoder
        if cfg.members is not None:   # an ensemble: what each member is
            model = " + ".join(name for name, _ in cfg.member_configs())
        _announce(start_line("resume" if resume is not None else "train", cfg, run_dir.path, model))
    parallel = {"par": par} if par else {}
    result = method.run(setup, run_dir, resume=resume is not None, **parallel)
    result["run_dir"] = str(run_dir.path)
    return result


def evaluate(model: str | Path = "smollm2-135m", task: str | None = None, **overrides) -> dict:
    """Evaluate a model (a name, a path, or a zoft run directory) on a task's eval split.

    ``task`` defaults to the run's own task for a run directory, else to sst2.

    ``trust_remote_code=True`` must be passed here to run a model folder's own Python; a run
    directory's config.yaml cannot turn it on.
    """
    path = Path(str(model))
    if (path / "config.yaml").is_file():   # a zoft run: rebuild its model and load its best weights
        from zoft.methods.common import evaluate as evaluate_split
        setup, scorer = load_run(path, task=task if task else None, **overrides)
        _announce(start_line("eval", setup.cfg, path, setup.cfg.model if setup.loaded else setup.cfg.encoder))
        enc = scorer.encode(setup.data.eval)
        return {"model": str(path), "task": setup.task.name, "compute_dtype": scorer.compute_dtype,
                "eval": evaluate_split(scorer, enc, setup.data.eval, setup.task, setup.cfg.eval_batch_size,
                                       progress=setup.cfg.progress, label="eval", decision=setup.cfg.decision)}
    return train(method="zero-shot", model=str(model), task=task or "sst2", **overrides)

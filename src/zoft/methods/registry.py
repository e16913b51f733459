"""The method registry, in PEFT's manner: one interface, many registered recipes.

Each method module registers a :class:`Method` that says what it runs, how a finished run of
it is loaded back as a scorer, and what it supports. Code outside the method modules asks the
registry (``get_method(cfg.method).loads_lm``) instead of comparing method names as strings.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoft.config import Config, load_config
from zoft.errors import ZoftError
from zoft.methods.common import Setup, prepare
from zoft.runs import RunDir


def load_lm_as_is(setup: Setup, run_dir: RunDir):
    """The scorer of a method that trains nothing the run keeps (zero-shot, ICL, LP): the base LM."""
    setup.loaded.model.eval()
    return setup.scorer()


@dataclass(frozen=True)
class Method:
    """A registered recipe.

    Attributes:
        name: what ``method=`` says.
        run: ``run(setup, run_dir, resume=False, **kw) -> result`` trains or evaluates and
            writes ``eval.json``.
        load: ``load(setup, run_dir) -> scorer`` rebuilds a finished run's scorer with its
            trained weights (``encode``/``predict``/``candidate_logprobs``, as
            :class:`zoft.lm.CandidateScorer`).
        modes: the values of ``mode=`` it supports.
        loads_lm: whether :func:`~zoft.methods.common.prepare` loads ``cfg.model`` for it.
        trains: it has steps, checkpoints and a training curve.
        parallel: it runs data- or direction-parallel under torchrun.
        trajectory: it can checkpoint as a trajectory of (seed, scalar) pairs only.
    """

    name: str
    run: Callable[..., dict]
    load: Callable[[Setup, RunDir], Any] = load_lm_as_is
    modes: tuple[str, ...] = ("full",)
    loads_lm: bool = True
    trains: bool = False
    parallel: bool = False
    trajectory: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ZoftError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_for(cfg: Config) -> Method:
    """The config's method, after checking it supports what the config asks of it."""
    method = get_method(cfg.method)
    if cfg.mode not in method.modes:
        raise ZoftError(f"config: method={method.name} supports mode={'|'.join(method.modes)}, not '{cfg.mode}'")
    if cfg.parallel != "none" and not method.parallel:
        raise ZoftError(f"config: parallel={cfg.parallel} is for methods that step in parallel "
                        f"({', '.join(m.name for m in METHODS.values() if m.parallel)}), not {method.name}")
    if not cfg.save_weights and not (method.trajectory and cfg.trajectory):
        raise ZoftError("config: save_weights=false needs a method that records a trajectory "
                        f"({', '.join(m.name for m in METHODS.values() if m.trajectory)}) with trajectory=true "
                        "(resume replays it)")
    return method


def load_run(run_path, task: str | None = None, trust_remote_code: bool = False, **overrides):
    """Rebuild a finished run's model with its best (else last) trained weights.

    ``trust_remote_code`` comes from the caller only: a run directory is data people send each
    other, and its config.yaml must never be able to run the Python of the model folder it names.

    Returns ``(setup, scorer)`` ready to evaluate or score new inputs.
    """
    run_dir = RunDir(Path(run_path))
    run_dir.read_config()   # one-line errors for a missing, broken or non-mapping config.yaml
    values = {**overrides, "trust_remote_code": trust_remote_code} | ({"task": task} if task else {})
    cfg = load_config(run_dir.path / "config.yaml", values)
    method = method_for(cfg)
    setup = prepare(cfg, load_lm=method.loads_lm)
    scorer = method.load(setup, run_dir)
    scorer.model.eval()
    return setup, scorer

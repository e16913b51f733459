"""An ensemble of scorers: the mean of its members' level probabilities ("ensemble").

The members are other runs on the same task: each a mapping of config keys over the ensemble's
own (``{method: lm-cls, lr: 5.0e-5}``, ``{method: bert-cls}``), trained one after the other into
``RUN_DIR/members/I-METHOD/``, or a finished run's folder, used as it is. Every member trains on
the ensemble's data (the data keys are the ensemble's alone, see
:data:`zoft.config.ENSEMBLE_KEYS`), so none has seen another's dev or eval rows.

A response's probability of each level is the mean of the members' (each member's softmax over
the levels); the prediction is its argmax and the confidence its maximum, as for one scorer. Two
scorers that err differently (a fine-tuned LM and a fine-tuned sentence encoder) err less
together: this is how the ASAP-SAS competition's best systems scored, and what
``configs/scoring.yaml`` recommends for a CPU.

Each member's ``eval.json`` already holds its level probabilities on the eval rows (from its best
weights), so the ensemble averages those rather than run every member over the eval split again
(Gemma-3-270M's 426 ASAP set-2 responses: 30 s); only its dev split is scored live. A member whose
stored outputs do not cover exactly these rows (another split, an older run without
probabilities, weights other than its best) is scored live, as ``zoft eval`` always scores.

Resume: a member with an ``eval.json`` is finished and kept; the member a kill interrupted
resumes from its last checkpoint (exactly, as any run does); the rest train afresh.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zoft.config import ENSEMBLE_KEYS, Config, load_config
from zoft.errors import ZoftError
from zoft.methods.common import (
    Setup,
    evaluate,
    evaluate_with_predictions,
    evaluation_line,
    metrics_and_outputs,
    prepare,
)
from zoft.methods.linear_probe import require_classification
from zoft.methods.registry import Method, get_method, load_run, method_for, register_method
from zoft.runs import RunDir
from zoft.tasks.decision import decide

METHOD = "ensemble"
DATA_KEYS = ("task", "data_dir", "n_train", "n_dev", "n_eval", "k_per_class", "data_seed")   # the rows a run uses
assert set(DATA_KEYS) <= set(ENSEMBLE_KEYS)   # members inherit them all


@dataclass
class EnsembleEncoded:
    """A split encoded once per member (each member has its own tokenizer)."""

    per_member: list

    def __len__(self) -> int:
        return len(self.per_member[0])

    @property
    def context_ids(self) -> list[list[int]]:
        """The longest member's token ids per example: what callers sort batches by."""
        return [max(ids, key=len) for ids in zip(*(enc.context_ids for enc in self.per_member))]


class EnsembleScorer:
    """Several classification scorers as one: the mean of their class probabilities."""

    kind = "classification"

    def __init__(self, scorers: list):
        self.scorers = scorers
        self.model = torch.nn.ModuleList([s.model for s in scorers])   # .eval()/.train() reach every member
        self.compute_dtype = ",".join(str(s.compute_dtype) for s in scorers)

    def frozen_weights(self):
        stack = contextlib.ExitStack()
        for s in self.scorers:
            stack.enter_context(s.frozen_weights())
        return stack

    def encode(self, examples) -> EnsembleEncoded:
        return EnsembleEncoded([s.encode(examples) for s in self.scorers])

    @torch.no_grad()
    def probabilities(self, enc: EnsembleEncoded, idx: list[int]) -> torch.Tensor:
        """(B, C) float64: the mean over members of each one's softmax over the classes."""
        per_member = [s.candidate_logprobs(e, idx)[0].double().softmax(-1) for s, e in zip(self.scorers, enc.per_member)]
        if len({tuple(p.shape) for p in per_member}) != 1:
            raise ZoftError(f"{METHOD}: the members score different numbers of classes "
                            f"({', '.join(str(p.shape[-1]) for p in per_member)})")
        return torch.stack(per_member).mean(0)

    def candidate_logprobs(self, enc: EnsembleEncoded, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) log of the mean probabilities, and ones (one "token" per class), as a scorer gives."""
        logprobs = self.probabilities(enc, idx).log().float()
        return logprobs, torch.ones_like(logprobs)

    def predict(self, enc: EnsembleEncoded, idx: list[int]) -> list[int]:
        return self.probabilities(enc, idx).argmax(-1).tolist()


# ---------------------------------------------------------------- members
@dataclass
class Member:
    name: str
    folder: Path
    config: Config | None   # None: a finished run named by its folder, used as it is


def members(cfg: Config, run_dir: RunDir) -> list[Member]:
    """The ensemble's members, each checked against the ensemble before anything trains."""
    out = []
    for name, spec in cfg.member_configs():
        if isinstance(spec, Config):
            method_for(spec)   # an unknown method, or a mode it lacks: one line, now
            out.append(Member(name, run_dir.path / "members" / name, spec))
            continue
        if not (spec / "config.yaml").is_file():
            raise ZoftError(f"{spec}: not a zoft run folder (no config.yaml); an ensemble member is a mapping "
                            "of keys or a finished run")
        if not (spec / "eval.json").is_file():
            raise ZoftError(f"{spec}: has not finished (no eval.json); finish it with --resume first")
        theirs = load_config(spec / "config.yaml", {"trust_remote_code": False})
        for key in DATA_KEYS:   # the same rows, so no member has trained on the ensemble's dev or eval rows
            if getattr(theirs, key) != getattr(cfg, key):
                raise ZoftError(f"{spec}: trained with {key}={getattr(theirs, key)!r}, the ensemble has "
                                f"{key}={getattr(cfg, key)!r}; a member must train on the ensemble's data")
        out.append(Member(name, spec, None))
    return out


def train_member(member: Member, resume: bool) -> None:
    """Train a mapping member into its folder; a finished one (eval.json) is kept."""
    if member.config is None or (member.folder / "eval.json").is_file():
        return
    config = member.config
    config.output_dir = str(member.folder)
    method = get_method(config.method)
    run_dir = RunDir(member.folder)
    again = resume and (member.folder / "config.yaml").is_file()
    setup = prepare(config, load_lm=method.loads_lm)
    if again:
        run_dir.sweep()   # temps of writes the kill cut short
    else:
        setup.pin_compute_dtype()   # as zoft.api.train does for a run of its own
        run_dir.clear()
        run_dir.write_config(config.to_dict())
    print(f"zoft: {METHOD}: {'resuming' if again else 'training'} member {member.name} in {member.folder}",
          flush=True)
    method.run(setup, run_dir, resume=again)


def load_member(member: Member, trust_remote_code: bool):
    """A finished member's scorer; remote code only on the caller's word (the ensemble's flag)."""
    if not (member.folder / "eval.json").is_file():
        raise ZoftError(f"{member.folder}: member {member.name} has not finished; resume the ensemble's run")
    return load_run(member.folder, trust_remote_code=trust_remote_code)[1]


def _member_result(member: Member) -> dict:
    """A finished member's eval.json."""
    path = member.folder / "eval.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ZoftError(f"{path}: unreadable or corrupt ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(result, dict):
        raise ZoftError(f"{path}: corrupt (expected a JSON object)")
    return result


def _member_summary(member: Member) -> dict:
    """What the ensemble's eval.json says of a member: its folder, model and own results."""
    result = _member_result(member)
    return {"name": member.name, "run_dir": str(member.folder), "method": result.get("method"),
            "model": result.get("model"), "eval": result.get("eval"), "train_seconds": result.get("train_seconds")}


def stored_probabilities(group: list[Member], examples, task) -> torch.Tensor | None:
    """(N, C) float64: the mean of the members' level probabilities on ``examples`` (the eval
    split) as their eval.json files hold them (rounded to 6 decimals), or None when some member's
    do not match these rows one for one: response ids and gold scores, in order. A member must
    also have been evaluated with the weights the ensemble loads (its best, ``load_best``)."""
    columns = task.response_columns(examples)
    if "ids" not in columns:   # a task without response ids: no way to be sure the rows are the same
        return None
    targets = [ex.target for ex in examples]
    per_member = []
    for member in group:
        config = member.config or load_config(member.folder / "config.yaml", {"trust_remote_code": False})
        outputs = _member_result(member).get("eval_outputs") or {}
        probabilities = outputs.get("probabilities")
        if (not config.load_best or outputs.get("ids") != columns["ids"] or outputs.get("targets") != targets
                or not isinstance(probabilities, list) or len(probabilities) != len(examples)):
            return None
        try:
            per_member.append(torch.tensor(probabilities, dtype=torch.float64))
        except (TypeError, ValueError, RuntimeError):   # an edited or damaged file: score the member live
            return None
    if len({tuple(p.shape) for p in per_member}) != 1:
        raise ZoftError(f"{METHOD}: the members score different numbers of classes "
                        f"({', '.join(str(p.shape[-1]) for p in per_member)})")
    return torch.stack(per_member).mean(0)


# ---------------------------------------------------------------- the method
def run(setup: Setup, run_dir: RunDir, resume: bool = False) -> dict:
    """Train each member in turn, then score dev and eval with the mean of their probabilities.

    Raises:
        ZoftError: not a classification task, a member that does not fit (see :func:`members`).
    """
    cfg, task, data = setup.cfg, setup.task, setup.data
    require_classification(task, METHOD)
    group = members(cfg, run_dir)
    start = time.perf_counter()
    for member in group:
        train_member(member, resume)
    scorer = load_ensemble(group, cfg.trust_remote_code)
    dev = evaluate(scorer, scorer.encode(data.dev), data.dev, task, cfg.eval_batch_size, cfg.progress, label="dev",
                   decision=cfg.decision)
    eval_start = time.perf_counter()
    stored = stored_probabilities(group, data.eval, task)
    if stored is None:
        metrics, outputs = evaluate_with_predictions(scorer, scorer.encode(data.eval), data.eval, task,
                                                     cfg.eval_batch_size, cfg.progress, label="eval",
                                                     decision=cfg.decision)
    else:
        metrics, outputs = metrics_and_outputs(task, decide(stored, cfg.decision), data.eval, stored.tolist())
        print(evaluation_line("eval (the members' stored probabilities)", metrics, len(data.eval),
                              time.perf_counter() - eval_start), file=sys.stderr, flush=True)
    summaries = [_member_summary(m) for m in group]
    result = {"method": METHOD, "mode": cfg.mode, "task": task.name,
              "model": "+".join(str(s["model"]) for s in summaries), "metric": task.metric, "eval": metrics,
              "dev": dev, "members": summaries, "n_train": len(data.train), "n_dev": len(data.dev),
              "n_eval": len(data.eval), "compute_dtype": scorer.compute_dtype,
              "train_seconds": round(sum(s["train_seconds"] or 0 for s in summaries), 1),
              "seconds_this_run": round(time.perf_counter() - start, 1), "eval_outputs": outputs}
    run_dir.write_json("eval.json", result)
    return result


def load_ensemble(group: list[Member], trust_remote_code: bool) -> EnsembleScorer:
    return EnsembleScorer([load_member(m, trust_remote_code) for m in group])


def load_ensemble_run(setup: Setup, run_dir: RunDir) -> EnsembleScorer:
    """The scorer of a finished ensemble run: every member with its best weights."""
    return load_ensemble(members(setup.cfg, run_dir), setup.cfg.trust_remote_code)


register_method(Method(METHOD, run, load=load_ensemble_run, loads_lm=False))

__all__ = ["EnsembleScorer", "load_ensemble_run", "members", "run"]

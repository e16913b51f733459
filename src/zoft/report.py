"""Comparison tables and plots across runs of one task, and the scoring report `zoft report` writes.

The report follows RSMTool (ETS), the reference for evaluating automated scoring: per item set
(task) and system, exact and adjacent agreement, QWK, Pearson r, SMD, RMSE and macro-F1
beside human-human agreement; score distributions; a confusion matrix per run; dev curves with
the best step; the same by subgroup; and for confidence routing, QWK on the automatically scored
part against coverage (the least confident responses go to a teacher). The pages come from the jinja2 templates in
``zoft/templates``; the predictions are also written in RSMTool's input format (``rsmtool/``).
"""
from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from zoft.atomic import atomic_file, atomic_write_text
from zoft.errors import ZoftError
from zoft.runs import RunDir

SMD_FLAG = 0.15   # RSMTool (after Williamson et al. 2012) flags |SMD| above this: scores off-centre


def label(result: dict) -> str:
    name = result["method"]
    if result.get("mode") and result["method"] in ("mezo", "lp-mezo", "ft", "lp-ft") and result["mode"] != "full":
        name += f" ({result['mode']})"
    if result["method"] == "icl":
        name += f" (k={result.get('k')})"
    return name


def fmt(metric: str, value: float) -> str:
    """Percentages for accuracy-like metrics; kappa stays on its own -1..1 scale, as it is reported."""
    return f"{value:.3f}" if metric == "qwk" else f"{100 * value:.1f}"


def markdown_table(results: list[dict]) -> str:
    """One row per run: method, eval metrics, best dev, steps, examples, train time."""
    metrics = sorted({m for r in results for m in r["eval"]}, key=lambda m: (m != results[0]["metric"], m))
    head = ["method", *[f"eval {m}" for m in metrics], "best dev", "steps", "n_train", "n_eval", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        dev = r.get("best_dev", (r.get("dev") or {}).get(r["metric"]))
        cells = [label(r), *[fmt(m, r["eval"][m]) if m in r["eval"] else "" for m in metrics],
                 fmt(r["metric"], dev) if isinstance(dev, (int, float)) else "",
                 str(r.get("steps", "")), str(r.get("n_train", "")), str(r.get("n_eval", "")),
                 str(r.get("train_seconds", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _dev_points(result: dict) -> list[tuple[int, float]]:
    if not result.get("run_dir") or not Path(result["run_dir"]).is_dir():
        return []
    return [(x["step"], x["dev"]) for x in RunDir(result["run_dir"]).read_metrics() if x.get("dev") is not None]


def plot_dev_curves(results: list[dict], path: Path, metric: str, names: Sequence[str] | None = None) -> Path:
    """Dev metric against step for the trained runs, a star at each run's best step; untrained
    runs as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results):
        name = names[i] if names else label(r)
        dev = _dev_points(r)
        if dev:
            ax.plot(*zip(*dev), marker="o", ms=3, label=name, color=f"C{i}")
            best_step, best = r.get("best_step"), r.get("best_dev")
            if best_step is None or best is None:   # an older eval.json: the best point of the curve
                best_step, best = max(dev, key=lambda p: p[1])
            ax.plot([best_step], [best], marker="*", ms=14, color=f"C{i}", markeredgecolor="black", ls="none")
        elif isinstance(r.get("dev"), dict) and metric in r["dev"]:
            ax.axhline(r["dev"][metric], ls="--", lw=1, label=name, color=f"C{i}")
    ax.set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric} against step (star: best step)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_comparison(results: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    atomic_write_text(out_dir / "comparison.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(results, indent=1))
    plot = plot_dev_curves(results, out_dir / "comparison.png", results[0]["metric"])
    return out_dir / "comparison.md", plot


def slug(text: object, limit: int = 60) -> str:
    """A file-name-safe form of a task name, method label or run name.

    Task names and labels come from eval.json files and configs (a task can be a YAML path),
    so they may hold ``/`` or ``..``: lowercase ``[a-z0-9._-]`` only, no leading or trailing
    dot or dash (hidden files, ``..``, option-like names), never empty.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()   # é -> e
    name = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    name = re.sub(r"[.-]*-[.-]*", "-", name)   # "x/../y" -> "x-y", not "x-..-y"
    name = name[:limit].strip(".-")
    return name or "x"


def _report_file(out_dir: Path, stem: str, suffix: str, used: set[str]) -> Path:
    """``out_dir/<stem><suffix>``, with ``-2``, ``-3``... added if an earlier file of this report
    has that name (two runs must never share, and so overwrite, one image)."""
    name, n = stem + suffix, 2
    while name in used:
        name, n = f"{stem}-{n}{suffix}", n + 1
    used.add(name)
    # slug() already rules this out; checked anyway because a name that escapes overwrites user files
    if Path(name).name != name or name in (".", ".."):
        raise ZoftError(f"{out_dir}: refusing to write '{name}' outside the report folder")
    return out_dir / name


# ---------------------------------------------------------------- one run's scores

@dataclass
class RunScores:
    """One run of a report: its eval.json, a name that tells it from the others, and, where it saved
    its eval predictions, the scores on the scale (``levels`` as numbers, else their indices)."""

    result: dict
    name: str                       # the method label, plus the run folder where labels repeat
    run: str                        # the run folder's name (or the label, for a bare eval.json)
    ids: list[str] = field(default_factory=list)
    human: list[float] = field(default_factory=list)
    system: list[float] = field(default_factory=list)
    second: list[float | None] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)
    subgroups: dict[str, list[str]] = field(default_factory=dict)
    confidences: list[float] = field(default_factory=list)   # per response, where the run saved them

    @property
    def scored(self) -> bool:
        return bool(self.system)


def _scale(levels: Sequence[str]) -> list[float]:
    """Score values of the levels: the numbers ASAP's "0".."3" name, else 0..K-1 (SemEval's words)."""
    try:
        values = [float(v) for v in levels]
    except ValueError:
        return list(range(len(levels)))
    return [int(v) if v.is_integer() else v for v in values]   # 2, not 2.0, on axes and in exports


def run_scores(result: dict, name: str) -> RunScores:
    run = Path(result["run_dir"]).name if result.get("run_dir") else label(result)
    scores = RunScores(result, name, run)
    outputs = result.get("eval_outputs") or {}
    targets, preds = outputs.get("targets") or [], outputs.get("predictions") or []
    if not targets or not all(isinstance(t, int) and isinstance(p, int) for t, p in zip(targets, preds)):
        return scores   # a generation task, or a run from before eval.json kept predictions
    k = max(len(outputs.get("levels") or []), max(targets) + 1, max(preds) + 1)
    scale = _scale(outputs["levels"]) if outputs.get("levels") else list(range(k))
    second = outputs.get("second_targets") or [None] * len(targets)
    ids = outputs.get("ids") or list(range(len(targets)))
    groups = outputs.get("subgroups") or {}
    where = Path(result["run_dir"]) / "eval.json" if result.get("run_dir") else run
    if len(preds) != len(targets) or min(targets + preds) < 0 or k > len(scale):
        raise ZoftError(f"{where}: corrupt eval_outputs (predictions and targets must be score indices, "
                        "one each per response)")
    if (len(second) != len(targets) or len(ids) != len(targets) or not isinstance(groups, dict)
            or any(not isinstance(v, list) or len(v) != len(targets) for v in groups.values())
            or any(b is not None and not (isinstance(b, int) and 0 <= b < len(scale)) for b in second)):
        raise ZoftError(f"{where}: corrupt eval_outputs (ids, second_targets and subgroups need one entry "
                        "per response)")
    scores.levels = scale
    scores.human = [scale[t] for t in targets]
    scores.system = [scale[p] for p in preds]
    scores.ids = [str(i) for i in ids]
    scores.second = [None if b is None else scale[b] for b in second]
    scores.subgroups = {str(c): [str(g) for g in v] for c, v in groups.items()}
    confidences = outputs.get("confidences") or []
    if confidences and (len(confidences) != len(targets)
                        or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in confidences)):
        raise ZoftError(f"{where}: corrupt eval_outputs (confidences must be one probability per response)")
    scores.confidences = [float(c) for c in confidences]
    return scores


def measures(human: Sequence[float], system: Sequence[float], levels: Sequence[float],
             pooled_smd: bool = False) -> dict:
    """:func:`zoft.tasks.metrics.agreement_measures` on score values; QWK distances are positions
    on the whole scale, levels that never occur included."""
    from zoft.tasks.metrics import agreement_measures
    return agreement_measures(human, system, list(levels), pooled_smd=pooled_smd)


def _macro_f1(human: Sequence[float], system: Sequence[float], levels: Sequence[float]) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(human, system, labels=list(levels), average="macro", zero_division=0))


# ---------------------------------------------------------------- table cells

MEASURE_HEAD = ["n", "exact % (accuracy)", "adjacent %", "QWK", "r", "SMD", "RMSE"]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _cell(text: str, flag: bool = False) -> dict:
    return {"text": text, "flag": flag}


def measure_cells(m: dict) -> list[dict]:
    smd = m.get("smd")
    return [_cell(str(m["n"])), _cell(_pct(m["exact"])), _cell(_pct(m["adjacent"])), _cell(_num(m["qwk"])),
            _cell(_num(m["r"])), _cell(_num(smd), smd is not None and abs(smd) > SMD_FLAG), _cell(_num(m["rmse"]))]


def system_row(s: RunScores) -> dict:
    r = s.result
    dev = r.get("best_dev", (r.get("dev") or {}).get(r.get("metric")))
    tail = [_cell(f"{dev:.3f}" if isinstance(dev, (int, float)) else ""), _cell(str(r.get("best_step") or "")),
            _cell(str(r.get("train_seconds", "")))]
    if s.scored:
        m = measures(s.human, s.system, s.levels)
        return {"kind": "system", "cells": [_cell(s.name), *measure_cells(m),
                                            _cell(_pct(_macro_f1(s.human, s.system, s.levels))), *tail]}
    ev = r.get("eval") or {}   # no saved predictions: what eval.json has, blanks for the rest
    cells = [_cell(s.name), _cell(str(r.get("n_eval", ""))), _cell(_pct(ev.get("acc"))), _cell(""),
             _cell(_num(ev["qwk"]) if "qwk" in ev else ""), _cell(""), _cell(""), _cell(""),
             _cell(_pct(ev.get("f1"))), *tail]
    return {"kind": "system", "cells": cells}


SYSTEM_HEAD = ["system", *MEASURE_HEAD, "macro-F1 %", "best dev", "best step", "train s"]


# ---------------------------------------------------------------- human-human agreement

def _data_root(runs: list[RunScores]) -> str | None:
    """The data folder a run of this task read (its saved config's ``data_dir``), if any."""
    for s in runs:
        run_dir = s.result.get("run_dir")
        if run_dir and (Path(run_dir) / "config.yaml").is_file():
            try:
                root = RunDir(run_dir).read_config().get("data_dir")
            except ZoftError:
                continue
            if root:
                return root
    return None


def _train_rater_scores(task: str, runs: list[RunScores]) -> tuple[list, list, list] | str:
    """Rater 1 and rater 2 on the task's training rows and the scale, or why they are not there."""
    from zoft.tasks import load_task
    from zoft.tasks.rubric import ScoringTask, load_scoring_task
    from zoft.tasks.rubric.task import is_scoring_task_name
    try:
        loaded = (load_scoring_task(task, _data_root(runs)) if is_scoring_task_name(task)
                  else load_task(task))
    except (ZoftError, OSError) as e:
        return f"the task's data could not be read ({str(e).splitlines()[0]})"
    pairs = loaded.train_rater_pairs() if isinstance(loaded, ScoringTask) else []
    if not pairs:
        return "the data has no second rater"
    scale = _scale(loaded.levels)
    return [scale[a] for a, _ in pairs], [scale[b] for _, b in pairs], scale


def human_rows(task: str, runs: list[RunScores]) -> tuple[list[dict], list[str]]:
    """Rows of human-human agreement (rater 2 against rater 1) and notes on where they come from.

    On the evaluated responses where they have a second rater (one row per distinct eval sample);
    otherwise on the training rows, labelled so, with their n."""
    rows, notes, seen = [], [], set()
    for s in runs:
        both = [(h, b) for h, b in zip(s.human, s.second) if b is not None]
        if not both or tuple(s.ids) in seen:
            continue
        seen.add(tuple(s.ids))
        shared = [o.run for o in runs if tuple(o.ids) == tuple(s.ids)]
        m = measures([h for h, _ in both], [b for _, b in both], s.levels, pooled_smd=True)
        rows.append({"kind": "human", "qwk": m["qwk"], "cells": [_cell("human–human (rater 2)"), *measure_cells(m),
                                                _cell(_pct(_macro_f1(*zip(*both), s.levels))),
                                                _cell(""), _cell(""), _cell("")]})
        notes.append(f"Human–human: rater 2 against rater 1 on the {m['n']} of these evaluated responses that "
                     f"a second rater scored (runs {', '.join(shared)}); SMD pooled, as RSMTool computes it.")
    if rows:
        return rows, notes
    found = _train_rater_scores(task, runs)
    if isinstance(found, str):
        return [], [f"Human–human agreement: not shown, {found}."]
    first, second, scale = found
    m = measures(first, second, scale, pooled_smd=True)
    rows.append({"kind": "human-train", "qwk": m["qwk"], "cells": [_cell("human–human (rater 2), train rows"), *measure_cells(m),
                                                  _cell(_pct(_macro_f1(first, second, scale))),
                                                  _cell(""), _cell(""), _cell("")]})
    notes.append(f"Human–human on the training rows, not on the responses scored above (those have no "
                 f"second rater): rater 2 against rater 1 on the {m['n']} training responses both scored.")
    return rows, notes


# ---------------------------------------------------------------- figures

def plot_score_distributions(runs: list[RunScores], path: Path, task: str) -> Path:
    """Percent of responses at each score: human (rater 1) beside each system."""
    import numpy as np
    plt = _pyplot()
    levels = max((s.levels for s in runs), key=len)
    human: dict[str, float] = {}
    for s in runs:   # the union of the evaluated responses, each once
        human.update(zip(s.ids, s.human))
    series = [("human (rater 1)", list(human.values()))] + [(s.name, s.system) for s in runs]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(levels) + 2), 3.8))
    x = np.arange(len(levels))
    for i, (name, values) in enumerate(series):
        pct = [100 * sum(v == level for v in values) / len(values) for level in levels]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, pct, width, label=name,
               color="0.35" if i == 0 else f"C{i - 1}")
    ax.set_xticks(x, [f"{v:g}" for v in levels])
    ax.set(xlabel="score", ylabel="% of responses", title=f"{task}: score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- subgroups

def subgroup_tables(runs: list[RunScores]) -> list[dict]:
    """Per subgroup column: each group × system whose data has that column, with n and RSMTool's measures."""
    tables = []
    for column in dict.fromkeys(c for s in runs for c in s.subgroups):
        rows, having = [], [s for s in runs if column in s.subgroups]
        for group in sorted({g for s in having for g in s.subgroups[column]}):
            for s in having:
                picked = [i for i, g in enumerate(s.subgroups[column]) if g == group]
                if not picked:
                    continue
                m = measures([s.human[i] for i in picked], [s.system[i] for i in picked], s.levels)
                rows.append({"kind": "system", "cells": [_cell(group), _cell(s.name), *measure_cells(m)]})
        tables.append({"column": column, "head": [column, "system", *MEASURE_HEAD], "rows": rows})
    return tables


# ---------------------------------------------------------------- confidence routing

REPORT_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)   # the table's columns; the figure draws every 10%


def coverage_section(task: str, runs: list[RunScores], human_qwk: float | None, out_dir: Path,
                     used: set[str]) -> dict | None:
    """QWK on the automatically scored part against coverage, for each run that saved confidences:
    a figure (one line per run, human-human QWK dashed) and a table, so a teacher can choose how
    much to check by hand. None when no run saved confidences."""
    from zoft.tasks.rubric.confidence import coverage_curve, coverage_plot
    curves = {s.name: coverage_curve(s.confidences, s.system, s.human, s.levels) for s in runs if s.confidences}
    if not curves:
        return None
    path = coverage_plot(curves, _report_file(out_dir, f"{slug(task)}-coverage", ".png", used),
                         title=f"{task}: the least confident responses go to a human", human_qwk=human_qwk)
    rows = []
    for name, curve in curves.items():
        at = {round(r["coverage"], 9): r["qwk"] for r in curve}
        rows.append({"cells": [_cell(name), *(_cell(_num(at.get(c))) for c in REPORT_COVERAGES)]})
    return {"figure": {"file": path.name, "caption": "QWK on the automatically scored responses against coverage "
                       "(the fraction scored automatically): the least confident responses, by the probability "
                       "of the predicted score, go to a human first."},
            "head": ["system", *(f"QWK at {c:.0%}" for c in REPORT_COVERAGES)], "rows": rows}


# ---------------------------------------------------------------- RSMTool input

def write_rsmtool_input(s: RunScores, csv_path: Path) -> Path:
    """The run's predictions as RSMTool reads them (``spkitemid``, ``sc1``, ``sc2`` where a second
    rater scored, the ``system`` score, the subgroup columns), and beside it an ``rsmeval``
    configuration (``<name>.json``): ``rsmeval <name>.json`` evaluates them."""
    has_second = any(b is not None for b in s.second)
    head = ["spkitemid", "sc1", *(["sc2"] if has_second else []), "system", *s.subgroups]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for i, item in enumerate(s.ids):
        second = [] if not has_second else ["" if s.second[i] is None else f"{s.second[i]:g}"]
        writer.writerow([item, f"{s.human[i]:g}", *second, f"{s.system[i]:g}",
                         *(values[i] for values in s.subgroups.values())])
    csv_path.parent.mkdir(exist_ok=True)
    atomic_write_text(csv_path, buffer.getvalue())
    config = {"experiment_id": re.sub(r"[^A-Za-z0-9_]", "_", csv_path.stem), "predictions_file": csv_path.name,
              "system_score_column": "system", "human_score_column": "sc1", "id_column": "spkitemid",
              "trim_min": min(s.levels), "trim_max": max(s.levels),
              "exclude_zero_scores": False,   # 0 is a real score on these rubrics, not a missing one
              "description": f"{s.result.get('task')}: {s.name}"}
    if has_second:
        config["second_human_score_column"] = "sc2"
    if s.subgroups:
        config["subgroups"] = list(s.subgroups)
    atomic_write_text(csv_path.with_suffix(".json"), json.dumps(config, indent=1) + "\n")
    return csv_path


# ---------------------------------------------------------------- the page

def _names(results: list[dict]) -> list[str]:
    """The method label, with the run folder added where two runs share a label (e.g. two seeds)."""
    labels = [label(r) for r in results]
    return [f"{lab} ({Path(r['run_dir']).name})" if labels.count(lab) > 1 and r.get("run_dir") else lab
            for lab, r in zip(labels, results)]


def task_section(task: str, runs: list[RunScores], out_dir: Path, used: set[str]) -> dict:
    """Everything the page shows for one item set: the table, its notes, figures, subgroups, exports."""
    results = [s.result for s in runs]
    scored = [s for s in runs if s.scored]
    humans, notes = human_rows(task, scored)
    if any(not s.scored for s in runs):
        notes.append("Rows with blanks come from runs that saved no eval predictions: only what their "
                     "eval.json reports.")
    metric = results[0].get("metric", "qwk")
    figures = []
    dev = plot_dev_curves(results, _report_file(out_dir, f"{slug(task)}-dev", ".png", used), metric,
                          [s.name for s in runs])
    figures.append({"file": dev.name, "caption": f"Dev {metric} against training step for each trained run "
                    "(a star marks the step whose weights were evaluated); dashed lines: untrained methods."})
    if scored:
        dist = plot_score_distributions(scored, _report_file(out_dir, f"{slug(task)}-scores", ".png", used), task)
        n = len({i for s in scored for i in s.ids})
        figures.append({"file": dist.name, "caption": f"Score distributions: percent of responses at each "
                        f"score, human rater 1 on the {n} evaluated responses beside each system."})
    from zoft.tasks.rubric.metrics import confusion_matrix_png
    exports = []
    for s in scored:
        title = s.name if s.run in s.name else f"{s.name} — {s.run}"
        path = _report_file(out_dir, f"{slug(task)}-{slug(s.run)}", "-confusion.png", used)
        confusion_matrix_png(s.human, s.system, s.levels, path, title=title)
        figures.append({"file": path.name, "caption": f"Confusion matrix of {title} on its {len(s.human)} "
                        "evaluated responses: rows human score, columns model score."})
        export = _report_file(out_dir / "rsmtool", f"{slug(task)}-{slug(s.run)}", ".csv", used)
        exports.append(write_rsmtool_input(s, export).relative_to(out_dir).as_posix())
    coverage = coverage_section(task, scored, humans[0]["qwk"] if humans else None, out_dir, used)
    if coverage:
        figures.append(coverage.pop("figure"))
    return {"task": task, "head": SYSTEM_HEAD, "rows": [system_row(s) for s in runs] + humans, "notes": notes,
            "figures": figures, "subgroups": subgroup_tables(scored), "coverage": coverage, "exports": exports}


def _templates():
    import jinja2
    return jinja2.Environment(loader=jinja2.PackageLoader("zoft", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                              lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def write_report(results: list[dict], out_dir: Path, title: str = "zoft report") -> Path:
    """One page per experiment, ``report.html`` and ``report.md`` from the same templates' data:
    per task (item set) a table of systems and human-human agreement, the dev curves, the score
    distributions, a confusion matrix per run, subgroup tables; plus RSMTool input files.

    File names are slugs of the task and run folder (see :func:`slug`), always inside ``out_dir``.
    """
    by_task = {}
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        # every run's predictions are read (and checked) before the first file is written
        by_task[task] = [run_scores(r, name) for r, name in zip(rows, _names(rows))]
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    sections = [task_section(task, runs, out_dir, used) for task, runs in by_task.items()]
    env = _templates()
    context = {"title": title, "sections": sections, "smd_flag": SMD_FLAG}
    atomic_write_text(out_dir / "report.md", env.get_template("report.md.j2").render(context))
    atomic_write_text(out_dir / "report.html", env.get_template("report.html.j2").render(context))
    return out_dir / "report.md"

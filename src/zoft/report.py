"""Comparison tables and plots across runs of one task."""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from zoft.errors import ZoftError
from zoft.atomic import atomic_file, atomic_write_text
from zoft.runs import RunDir


def label(result: dict) -> str:
    name = result["method"]
    if result.get("mode") and result["method"] in ("mezo", "ft", "lp-ft") and result["mode"] != "full":
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


def plot_dev_curves(results: list[dict], path: Path, metric: str) -> Path:
    """Dev metric against step for the trained runs; untrained ones as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results):
        records = RunDir(r["run_dir"]).read_metrics()
        dev = [(x["step"], x["dev"]) for x in records if x.get("dev") is not None]
        if dev:
            ax.plot(*zip(*dev), marker="o", ms=3, label=label(r), color=f"C{i}")
        elif isinstance(r.get("dev"), dict) and metric in r["dev"]:
            ax.axhline(r["dev"][metric], ls="--", lw=1, label=label(r), color=f"C{i}")
    ax.set(xlabel="step", ylabel=f"dev {metric}", title="dev metric against step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def write_comparison(results: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    atomic_write_text(out_dir / "comparison.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(results, indent=1))
    plot = plot_dev_curves(results, out_dir / "comparison.png", results[0]["metric"])
    return out_dir / "comparison.md", plot


def human_ceiling(task_name: str) -> float | None:
    """Human-human agreement (QWK) of a scoring task, where the data has a second rater."""
    from zoft.tasks import load_task
    try:
        return getattr(load_task(task_name), "human_qwk", None)
    except Exception:   # a task that cannot be loaded here: report without the ceiling
        return None


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
    """``out_dir/<stem><suffix>``, with ``-2``, ``-3``... added if an earlier figure of this report
    has that name (two runs must never share, and so overwrite, one image)."""
    name, n = stem + suffix, 2
    while name in used:
        name, n = f"{stem}-{n}{suffix}", n + 1
    used.add(name)
    # slug() already rules this out; checked anyway because a name that escapes overwrites user files
    if Path(name).name != name or name in (".", ".."):
        raise ZoftError(f"{out_dir}: refusing to write '{name}' outside the report folder")
    return out_dir / name


def write_report(results: list[dict], out_dir: Path, title: str = "zoft report") -> Path:
    """One markdown page (and an HTML copy) per experiment: a table per task (item set), the dev
    curves, a confusion matrix per run where predictions were saved, and the human ceiling.

    Figure names are slugs of the task and method label (see :func:`slug`), always inside
    ``out_dir``; runs sharing a label are told apart by their run folder's name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    lines = [f"# {title}", ""]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        lines += [f"## {task}", "", markdown_table(rows)]
        ceiling = human_ceiling(task)
        if ceiling is not None:
            lines += [f"Human agreement (QWK, rater 1 vs rater 2, train rows): **{ceiling:.3f}**", ""]
        plot = plot_dev_curves(rows, _report_file(out_dir, f"{slug(task)}-dev", ".png", used), rows[0]["metric"])
        lines += [f"![dev curves]({plot.name})", ""]
        shared = Counter(label(r) for r in rows)
        for r in rows:
            outputs = r.get("eval_outputs") or {}
            if outputs and all(isinstance(t, int) for t in outputs.get("targets", [])):
                from zoft.tasks.rubric.metrics import confusion_matrix_png
                caption, stem = label(r), f"{slug(task)}-{slug(label(r))}"
                if shared[caption] > 1 and r.get("run_dir"):   # e.g. two seeds of one method
                    run_name = Path(r["run_dir"]).name
                    caption, stem = f"{caption} ({run_name})", f"{stem}-{slug(run_name)}"
                path = _report_file(out_dir, stem, "-confusion.png", used)
                labels = sorted(set(outputs["targets"]) | set(outputs["predictions"]))
                confusion_matrix_png(outputs["targets"], outputs["predictions"], labels, path, title=caption)
                lines += [f"{caption}: ![confusion]({path.name})", ""]
    text = "\n".join(lines)
    atomic_write_text(out_dir / "report.md", text)
    atomic_write_text(out_dir / "report.html", markdown_to_html(lines, title))
    return out_dir / "report.md"


def markdown_to_html(lines: list[str], title: str) -> str:
    """The small markdown subset the report uses: headings, pipe tables, images, paragraphs."""
    import html as html_lib
    out, in_table = [f"<html><head><meta charset='utf-8'><title>{html_lib.escape(title)}</title></head><body>"], False
    for line in lines:
        is_row = line.startswith("|")
        if in_table and not is_row:
            out.append("</table>")
        if is_row and not in_table:
            out.append("<table border='1' cellpadding='4'>")
        in_table = is_row
        if is_row:
            if "---" not in line:
                cells = [html_lib.escape(c.strip()) for c in line.strip().strip("|").split("|")]
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html_lib.escape(line.lstrip('# '))}</h{level}>")
        elif "![" in line:
            before, _, rest = line.partition("![")
            src = rest.split("(", 1)[1].rstrip(")")
            out.append(f"<p>{html_lib.escape(before)}<img src='{html_lib.escape(src)}' style='max-width:640px'></p>")
        elif line.strip():
            out.append(f"<p>{html_lib.escape(line.replace('**', ''))}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out + ["</body></html>"])

"""Comparison tables and plots across runs of one task."""
from __future__ import annotations

import json
from pathlib import Path

from zoft.runs import RunDir, atomic_write_text


def label(result: dict) -> str:
    name = result["method"]
    if result.get("mode") and result["method"] in ("mezo", "ft", "lp-ft") and result["mode"] != "full":
        name += f" ({result['mode']})"
    if result["method"] == "icl":
        name += f" (k={result.get('k')})"
    return name


def markdown_table(results: list[dict]) -> str:
    """One row per run: method, eval metrics, best dev, steps, examples, train time."""
    metrics = sorted({m for r in results for m in r["eval"]}, key=lambda m: (m != results[0]["metric"], m))
    head = ["method", *[f"eval {m}" for m in metrics], "best dev", "steps", "n_train", "n_eval", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        dev = r.get("best_dev", (r.get("dev") or {}).get(r["metric"]))
        cells = [label(r), *[f"{100 * r['eval'][m]:.1f}" if m in r["eval"] else "" for m in metrics],
                 f"{100 * dev:.1f}" if isinstance(dev, (int, float)) else "",
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_comparison(results: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    atomic_write_text(out_dir / "comparison.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(results, indent=1))
    plot = plot_dev_curves(results, out_dir / "comparison.png", results[0]["metric"])
    return out_dir / "comparison.md", plot

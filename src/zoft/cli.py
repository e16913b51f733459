"""Command line: argument parsing only; the work happens in zoft.api and zoft.methods.

    zoft train [CONFIG.yaml] [key=value ...] [--resume RUN_DIR]
    zoft eval  --model NAME|PATH|RUN_DIR --task TASK [key=value ...]
    zoft compare --task sst2 --methods zero-shot,icl,lp,mezo,mezo:lora,ft [key=value ...]
    zoft report RUN_OR_COMPARE_DIR ... [--output-dir DIR]
    zoft score --model RUN_DIR --input responses.csv --output scored.csv
    zoft serve --model RUN_DIR [--port 8000]
    zoft replay BASE TRAJECTORY --output DIR
    zoft demo
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from zoft.errors import ZoftError


def _overrides(items: list[str]) -> dict:
    from zoft.config import parse_overrides
    return parse_overrides(items)


def cmd_train(args) -> None:
    from zoft import api
    from zoft.report import markdown_table
    result = api.train(args.config, resume=args.resume, **_overrides(args.overrides))
    if result.get("rank", 0) != 0:   # torchrun: rank 0 reports for all
        return
    print(markdown_table([result]))
    print(f"run directory: {result['run_dir']}")


def cmd_eval(args) -> None:
    from zoft import api
    options = _overrides(args.overrides) | ({"trust_remote_code": True} if args.trust_remote_code else {})
    result = api.evaluate(args.model, task=args.task, **options)
    print(json.dumps(result, indent=1))


def cmd_compare(args) -> None:
    from zoft import api
    from zoft.config import load_config
    from zoft.models import load_model
    from zoft.report import slug, write_comparison
    from zoft.runs import RunDir
    options = _overrides(args.overrides)
    # "key=v" applies to every method; "mezo.key=v" to all MeZO runs; "mezo:lora.key=v" to one spec.
    shared = {k: v for k, v in options.items() if "." not in k}
    scoped = {k: v for k, v in options.items() if "." in k}
    base = load_config(args.config, shared)
    out = Path(args.output_dir or base.resolved_output_dir().with_name(f"compare-{Path(base.task).stem}"))
    specs = [spec.strip() for spec in args.methods.split(",")]
    unused = {k for k in scoped if k.rsplit(".", 1)[0] not in specs + [s.partition(":")[0] for s in specs]}
    if unused:
        raise ZoftError(f"option '{sorted(unused)[0]}' names no method in --methods {args.methods}")
    # an earlier comparison's method folders would outlive this one's and mix into its report
    RunDir(out).check_usable(overwrite=base.overwrite_output_dir, resumable=False)
    RunDir(out).clear()
    results = []
    for spec in specs:
        method, _, mode = spec.partition(":")
        overrides = {"method": method, "mode": mode or "full", "output_dir": str(out / slug(spec.replace(":", "-")))}
        for scope in (method, spec):   # the more specific scope wins
            overrides |= {k.rsplit(".", 1)[1]: v for k, v in scoped.items() if k.rsplit(".", 1)[0] == scope}
        # each method starts from a fresh copy of the base weights: trained methods change them in place
        loaded = load_model(base.model, dtype=base.dtype, device=base.device,
                            trust_remote_code=base.trust_remote_code)
        print(f"== {spec}", flush=True)
        # lr=auto is MeZO's default, not FT's: an lr left at "auto" takes each method's own default
        results.append(api.train(base.to_dict() | {"lr": None if base.lr == "auto" else base.lr} | overrides,
                                 loaded=loaded))
    table, plot = write_comparison(results, out)
    print(table.read_text())
    print(f"table: {table}\nplot: {plot}")


def _read_json(path: Path, kind: type):
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ZoftError(f"{path}: corrupt ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(value, kind):
        raise ZoftError(f"{path}: corrupt (expected a JSON {'list' if kind is list else 'object'})")
    return value


def cmd_report(args) -> None:
    from zoft.report import write_report
    results = []
    for path in map(Path, args.runs):
        if (path / "comparison.json").is_file():
            found = _read_json(path / "comparison.json", list)
            if not all(isinstance(r, dict) for r in found):
                raise ZoftError(f"{path / 'comparison.json'}: corrupt (expected a list of results)")
            for r in found:   # a comparison folder that was moved: its runs are still inside it
                moved = path / Path(str(r.get("run_dir", ""))).name
                if r.get("run_dir") and not Path(r["run_dir"]).is_dir() and moved.is_dir():
                    r["run_dir"] = str(moved)
            results += [(path / "comparison.json", r) for r in found]
        elif (path / "eval.json").is_file():
            results.append((path / "eval.json", _read_json(path / "eval.json", dict) | {"run_dir": str(path)}))
        else:
            raise ZoftError(f"{path}: neither a run (eval.json) nor a comparison (comparison.json)")
    for source, r in results:
        missing = next((key for key in ("task", "method", "eval") if key not in r), None)
        if missing:
            raise ZoftError(f"{source}: corrupt (a result without '{missing}')")
    results = [r for _, r in results]
    out = Path(args.output_dir or (Path(args.runs[0]) / "report"))
    page = write_report(results, out, title=args.title)
    print(f"report: {page} and {page.with_suffix('.html')}")


def cmd_score(args) -> None:
    from zoft.scoring.score import score_file
    summary = score_file(args.model, args.input, args.output, batch_size=args.batch_size,
                         trust_remote_code=args.trust_remote_code, review_fraction=args.review_fraction,
                         gold_column=args.gold_column)
    print(f"scored {summary['scored']} of {summary['rows']} rows -> {summary['output']}; "
          f"score counts {summary['score_counts']}")
    if "review" in summary:
        print(f"{summary['review']} least confident rows marked needs_review")
    if "coverage" in summary:
        from zoft.tasks.rubric.confidence import coverage_table
        print(coverage_table(summary["coverage"]) + f"coverage: {', '.join(summary['coverage_files'])}")
    for error in summary["errors"]:
        print(f"  {error}", file=sys.stderr)
    if summary["failed"]:
        print(f"{summary['failed']} rows failed; see the 'error' column", file=sys.stderr)


def cmd_serve(args) -> None:
    import os
    from zoft.scoring.serve import MAX_BODY_BYTES, serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("ZOFT_API_KEY"),
          max_body_bytes=MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes,
          trust_remote_code=args.trust_remote_code)


def cmd_replay(args) -> None:
    from zoft.methods.replay import rebuild
    out = rebuild(args.base, args.trajectory, args.output, device=args.device,
                  trust_remote_code=args.trust_remote_code)
    print(f"rebuilt weights: {out}")


def cmd_demo(args) -> None:
    from zoft.demo import main as demo
    demo(_overrides(args.overrides))


def _config_keys() -> str:
    """Every config key with its default and meaning, for ``zoft train --help`` (the keys a YAML config takes)."""
    import dataclasses

    from zoft.config import AUTO, DEFAULT_LR, KEY_HELP, Config
    shown = {"lr": f"{AUTO}|{DEFAULT_LR:g}"}   # the method's default: auto for MeZO, a number for the others
    keys = [(f"{f.name}={shown.get(f.name, '' if f.default is None else f.default)}", KEY_HELP.get(f.name, ""))
            for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING]
    width = max(len(k) for k, _ in keys) + 2
    return "config keys, as key=value or in a YAML config (defaults shown):\n" + "\n".join(
        f"  {key:<{width}}{meaning}" for key, meaning in keys)


TRUST_HELP = ("run the Python code a model folder ships (transformers' trust_remote_code); "
              "a run directory's own config can never turn this on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoft", description="Fine-tune LMs with forward passes only (MeZO), "
                                     "against zero-shot, ICL, linear probing and backprop baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or evaluate one method on one task", epilog=_config_keys(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="key=value options, e.g. lr=1e-6 steps=500")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="evaluate a model or a trained run on a task")
    p.add_argument("--model", required=True, help="builtin name, model path, or run directory")
    p.add_argument("--task", default=None, help="task name or YAML (default: the run's task, else sst2)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("compare", help="several methods on one task: a markdown table and a plot")
    p.add_argument("config", nargs="?", help="base YAML config")
    p.add_argument("--methods", default="zero-shot,icl,lp,mezo,mezo:lora,ft",
                   help="comma list of METHOD[:MODE]; per-method options as METHOD.key=value")
    p.add_argument("--output-dir", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("report", help="an RSMTool-style scoring report (HTML + markdown) and RSMTool input files "
                       "from runs or comparisons")
    p.add_argument("runs", nargs="+", help="run directories and/or compare output directories")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--title", default="zoft report")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("score", help="score new responses with a trained scorer (CSV: id, text[, item_id])")
    p.add_argument("--model", required=True, metavar="RUN_DIR")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--review-fraction", type=float, default=None, metavar="F",
                   help="mark the ceil(F*n) least confident rows needs_review (0 <= F <= 1)")
    p.add_argument("--gold-column", default=None, metavar="NAME",
                   help="a column of human scores: write QWK of the automatic part against coverage")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions endpoint for a trained scorer")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="a trained zoft run on a scoring task")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (default: $ZOFT_API_KEY, "
                   "which other users cannot see in ps; else none)")
    p.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="refuse larger request bodies with 413 (default 1 MiB)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("replay", help="rebuild a MeZO run's weights from its base model and trajectory")
    p.add_argument("base", help="the base model (builtin name or path) the run started from")
    p.add_argument("trajectory", help="trajectory.safetensors (or the run directory holding it)")
    p.add_argument("--output", required=True, help="folder for the rebuilt weights (safetensors)")
    p.add_argument("--device", default=None, help="default: the device type the run trained on")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser("demo", help="zero-shot vs MeZO on SST-2 with SmolLM2-135M, sized for a 2-core CPU")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:   # `zoft train lr=1e-6` with no YAML
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        args.fn(args)
    except ZoftError as e:
        print(f"zoft: error: {e}", file=sys.stderr)
        distributed = sys.modules.get("zoft.distributed")   # loaded only if the run went parallel
        if distributed is not None and isinstance(e, distributed.DistError):
            # A peer rank is gone: gloo's background threads cannot be torn down cleanly, and the
            # interpreter's normal exit would abort ("terminate called ...", SIGABRT) after the line.
            import os
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("zoft: interrupted; the last checkpoint is intact (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

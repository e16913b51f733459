"""The command line: compare writes a table and a plot; bad input is one line on stderr, exit 2."""
import json
import re
from pathlib import Path

import pytest

from zoft.cli import main


def test_compare_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "zero-shot,icl,mezo", "--output-dir", str(out), "model=tiny-llama",
                 "task=sst2", "n_train=16", "n_dev=8", "n_eval=16", "steps=4", "eval_every=2", "icl_k=2",
                 "mezo.lr=1e-3", "progress=false", "max_length=48"])
    assert code == 0
    table = (out / "comparison.md").read_text()
    assert "| zero-shot |" in table and "| icl (k=2) |" in table and "| mezo |" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in results] == ["zero-shot", "icl", "mezo"]
    assert results[2]["steps"] == 4
    # per-method options reach only their method
    assert json.loads((out / "mezo" / "eval.json").read_text())["steps"] == 4
    import yaml
    assert yaml.safe_load((out / "mezo" / "config.yaml").read_text())["lr"] == 1e-3
    assert yaml.safe_load((out / "zero-shot" / "config.yaml").read_text())["lr"] != 1e-3


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "broken", "label": 1\n')
    (tmp_path / "task.yaml").write_text(
        "task: bad\ndataset_path: .\ndata_files: {train: bad.jsonl, validation: bad.jsonl}\n"
        "training_split: train\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{sentence}}'\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: label\n")
    run = tmp_path / "run"
    code = main(["train", f"task={tmp_path / 'task.yaml'}", "model=tiny-llama", f"output_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "bad.jsonl:2" in err
    assert not run.exists()

    for args, needle in ((["train", "method=magic"], "unknown method 'magic'"),
                         (["train", "colour=blue"], "unknown option 'colour'"),
                         (["train", "steps=many"], "'steps' expects int"),
                         (["train", f"model={tmp_path}", "task=sst2", "n_eval=2"], str(tmp_path))):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_eval_of_a_run_reproduces_its_final_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "method=mezo", "mode=lora", "model=tiny-llama", "task=sst2", "n_train=16", "n_dev=8",
                 "n_eval=16", "steps=6", "eval_every=2", "lr=5e-2", "eps=1e-1", "progress=false",
                 f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run)]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{"):])
    assert evaluated["eval"] == json.loads((run / "eval.json").read_text())["eval"]


SMALL = ["model=tiny-llama", "task=sst2", "n_train=16", "n_dev=8", "n_eval=8", "max_length=48", "progress=false",
         "steps=2", "eval_every=2"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoft: error: "), err
    return err.strip()


def test_bad_options_are_refused_up_front(tmp_path, capsys):
    out = tmp_path / "run"
    for option, needle in (("lr=-1", "lr must be a finite number > 0, got -1.0"),
                           ("lr=nan", "lr must be a finite number > 0, got nan"),
                           ("lr=.inf", "lr must be a finite number > 0, got inf"),
                           ("eps=nan", "eps must be a finite number > 0"),
                           ("save_every=0", "save_every must be >= 1"),
                           ("n_train=0", "n_train must be >= 1, got 0"),
                           ("n_dev=0", "n_dev must be >= 1, got 0"),
                           ("weight_decay=-0.1", "weight_decay must be finite and >= 0")):
        assert needle in one_line_error(capsys, ["train", *SMALL, option, f"output_dir={out}"])
        assert not out.exists()


def test_unusable_output_dirs_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = one_line_error(capsys, ["train", *SMALL, f"output_dir={afile}"])
    assert err == f"zoft: error: {afile}: exists and is not a directory; choose another output_dir"
    err = one_line_error(capsys, ["train", *SMALL, f"output_dir={afile}/run"])
    assert err == f"zoft: error: {afile}/run: cannot create the run directory: {afile} is not a directory"
    assert afile.read_text() == "x"

    import tempfile   # a read-only folder (simulated: the tests run as root, whom chmod does not stop)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr("zoft.models.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    err = one_line_error(capsys, ["train", *SMALL, f"output_dir={tmp_path / 'ro' / 'run'}"])
    assert err == f"zoft: error: {tmp_path / 'ro' / 'run'}: cannot write: Permission denied"


def error_after_start(capsys, argv) -> str:
    """A run that fails once started: its start line, then one error line."""
    assert main(argv) == 2
    start, *errors = capsys.readouterr().err.splitlines()
    assert start.startswith("zoft: train: ") and len(errors) == 1 and errors[0].startswith("zoft: error: "), errors
    return errors[0]


def test_an_overflowing_update_is_one_line(tmp_path, capsys):
    err = error_after_start(capsys, ["train", *SMALL, "method=ft", "lr=3e38", f"output_dir={tmp_path / 'ft'}"])
    assert "step 1: the update overflows" in err or "step 1: loss is nan" in err
    err = error_after_start(capsys, ["train", *SMALL, "method=mezo", "lr=3e38", f"output_dir={tmp_path / 'mezo'}"])
    # the divergence guard rolls back and halves the lr, then stops after guard_max_rollbacks
    assert "training diverged" in err and "after 3 rollbacks" in err


def small_task(folder, n_rows: int) -> None:
    """``folder/task.yaml``: a two-class YAML task over ``n_rows`` rows of ``folder/train.jsonl``."""
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(n_rows)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(
        "task: small\ndataset_path: .\ndata_files: {train: train.jsonl, validation: train.jsonl}\n"
        "training_split: train\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{text}}'\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: label\n")


def test_the_defaults_on_a_small_training_split_give_a_working_run(tmp_path, caplog):
    """32 training rows under the default n_train=1000, n_dev=500: a warning and dev rows, not 0 dev and a crash."""
    small_task(tmp_path, 32)
    out = tmp_path / "run"
    for method in ("zero-shot", "mezo"):
        assert main(["train", f"task={tmp_path / 'task.yaml'}", "model=tiny-llama", f"method={method}", "steps=2",
                     "eval_every=2", "progress=false", f"output_dir={out / method}"]) == 0
        result = json.loads((out / method / "eval.json").read_text())
        assert "acc" in result["eval"]
    assert (result["n_train"], result["n_dev"]) == (21, 11)
    assert "using 21 train, 11 dev" in caplog.text


def test_a_corrupt_report_input_is_one_line(tmp_path, capsys):
    (tmp_path / "eval.json").write_text('{"method": "mezo", ')
    err = one_line_error(capsys, ["report", str(tmp_path)])
    assert err.startswith(f"zoft: error: {tmp_path / 'eval.json'}: corrupt")


def test_a_typo_gets_a_suggestion(capsys):
    assert "unknown option 'lrr'; did you mean 'lr'?" in one_line_error(capsys, ["train", "lrr=1e-4"])


def test_evaluate_of_a_run_uses_the_runs_own_task(tmp_path):
    """zoft.evaluate(run_dir), as the README shows it, used to evaluate every run on SST-2."""
    from zoft import api
    small_task(tmp_path, 24)
    run = tmp_path / "run"
    api.train(method="zero-shot", model="tiny-llama", task=str(tmp_path / "task.yaml"), n_train=8, n_dev=8,
              n_eval=8, progress=False, output_dir=str(run))
    result = api.evaluate(run)
    assert result["task"] == "small"
    assert result["eval"] == json.loads((run / "eval.json").read_text())["eval"]


def test_the_demo_can_run_twice(tmp_path, monkeypatch):
    """`make demo` writes into its own runs/demo: a second run replaces the first instead of refusing."""
    from zoft.demo import main as demo
    monkeypatch.chdir(tmp_path)
    small = {"model": "tiny-llama", "n_train": 16, "n_dev": 8, "n_eval": 8, "max_length": 48, "steps": 2,
             "eval_every": 1, "progress": False}
    first = demo(dict(small))
    second = demo(dict(small))
    assert second["mezo"]["eval"] == first["mezo"]["eval"]
    assert [p.name for p in (tmp_path / "runs" / "demo" / "mezo").glob("checkpoint-*")] == ["checkpoint-2"]


def test_train_help_lists_every_config_key(capsys):
    import dataclasses

    from zoft.config import Config
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(f"{f.name}=" in out for f in dataclasses.fields(Config))
    assert "lr=auto|1e-06" in out and "overwrite_output_dir=False" in out


def test_train_help_gives_each_keys_meaning(capsys):
    """Each key's line carries its one-line meaning, taken from zoft.config.KEY_HELP."""
    import dataclasses

    from zoft.config import KEY_HELP, Config
    assert set(KEY_HELP) == {f.name for f in dataclasses.fields(Config)}   # a new key needs its line
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for f in dataclasses.fields(Config):
        line = next(line for line in lines if line.strip().startswith(f"{f.name}="))
        assert line.rstrip().endswith(KEY_HELP[f.name]), line
    assert any(line.split() == ["lr=auto|1e-06", *KEY_HELP["lr"].split()] for line in lines)


def test_each_run_starts_with_a_line_naming_task_model_method_and_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "method=mezo", "mode=lora", f"output_dir={run}"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"zoft: train: task sst2, model tiny-llama, method mezo, mode lora, run directory {run}"
    assert main(["eval", "--model", str(run), "n_eval=4"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"zoft: eval: task sst2, model tiny-llama, method mezo, mode lora, run directory {run}"
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "zero-shot,mezo:prefix", "--output-dir", str(out), *SMALL]) == 0
    starts = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoft: train: ")]
    assert starts == [f"zoft: train: task sst2, model tiny-llama, method {method}, mode {mode}, run directory "
                      f"{out / folder}" for method, mode, folder in (("zero-shot", "full", "zero-shot"),
                                                                     ("mezo", "prefix", "mezo-prefix"))]


def test_progress_false_prints_one_line_per_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "steps=4", "lr=5e-2", "eps=1e-1", f"output_dir={run}"]) == 0
    err = capsys.readouterr().err.splitlines()
    dev = {r["step"]: r["dev"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "dev" in r}
    lines = [line for line in err if line.startswith(("dev step", "eval:"))]
    assert len(lines) == 3 and len(err) == 4 and err[0].startswith("zoft: train: "), err   # nothing else
    for line, step in zip(lines, (2, 4)):
        assert line.startswith(f"dev step {step}: acc {dev[step]:.4f}, best {max(dev[s] for s in dev if s <= step):.4f}")
    acc = json.loads((run / "eval.json").read_text())["eval"]["acc"]
    assert lines[2].startswith(f"eval: acc {acc:.4f} (8 examples, ")


@pytest.mark.parametrize("method", ["zero-shot", "lp"])
def test_progress_false_prints_one_line_per_split_of_an_untrained_method(tmp_path, capsys, method):
    run = tmp_path / "run"
    assert main(["train", *SMALL, f"method={method}", f"output_dir={run}"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("dev:", "eval:"))]
    result = json.loads((run / "eval.json").read_text())
    assert len(lines) == 2, lines
    for split in ("dev", "eval"):
        line = next(line for line in lines if line.startswith(f"{split}:"))
        assert line.startswith(f"{split}: acc {result[split]['acc']:.4f} (8 examples, "), line


def test_progress_shows_an_evaluation_bar(tmp_path, capsys):
    assert main(["train", *SMALL, "method=zero-shot", "progress=true", f"output_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    # the bar's first frame ("eval:   0%| ... | 0/8") is always drawn; later frames depend on how fast
    # the machine is (tqdm's refresh interval), so the test does not wait for "100%"
    assert re.search(r"eval: +\d+%\|.*\| [0-8]/8 \[", err), err
    assert "eval: acc" not in err   # the bar replaces the summary line


def test_threads_sets_torchs_cpu_threads(tmp_path, capsys):
    import torch
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        assert main(["train", *SMALL, "method=zero-shot", f"threads={wanted}", f"output_dir={tmp_path / 'run'}"]) == 0
        assert torch.get_num_threads() == wanted
        capsys.readouterr()
    finally:
        torch.set_num_threads(before)
    assert "threads must be >= 1" in one_line_error(capsys, ["train", *SMALL, "threads=0"])


def test_eval_of_a_model_name_without_a_task_uses_sst2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "tiny-llama", "n_train=4", "n_dev=4", "n_eval=4", "max_length=48",
                 "progress=false"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["task"] == "sst2"


def test_report_to_tensorboard_needs_the_package(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # as if not installed
    err = one_line_error(capsys, ["train", *SMALL, "report_to=tensorboard", f"output_dir={tmp_path / 'run'}"])
    assert "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()


def test_report_to_tensorboard_logs_loss_lr_and_dev_per_step(tmp_path, monkeypatch):
    """A stand-in SummaryWriter (the package is an extra) records what the loop hands TensorBoard."""
    import importlib.machinery
    import sys
    import types
    written, dirs = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            dirs.append(log_dir)

        def add_scalar(self, tag, value, step):
            written.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            written.append("closed")
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    package = types.ModuleType("tensorboard")
    package.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", package)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run = tmp_path / "run"
    assert main(["train", *SMALL, "steps=4", "lr=5e-2", "eps=1e-1", "report_to=tensorboard",
                 f"output_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert written[-1] == "closed"
    assert [(s, v) for t, s, v in written[:-1] if t == "train/loss"] == [(r["step"], r["loss"]) for r in records]
    assert [(s, v) for t, s, v in written[:-1] if t == "train/learning_rate"] == [(r["step"], 5e-2) for r in records]
    assert [(s, v) for t, s, v in written[:-1] if t == "eval/acc"] == [(r["step"], r["dev"]) for r in records
                                                                        if "dev" in r]
    assert len(dirs) == 1 and Path(dirs[0]).parent == run / "tensorboard"

"""The command line: compare writes a table and a plot; bad input is one line on stderr, exit 2."""
import json

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

"""Run directories as HF users know them: no run overwrites another unasked, temps of killed
writes are swept, and a run directory can never switch on remote code."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zoft import api, cli
from zoft.errors import ZoftError
from zoft.models import tiny_random_model
from zoft.runs import RunDir

SMALL = dict(task="sst2", model="tiny-llama", n_train=32, n_dev=16, n_eval=16, batch_size=8, eval_batch_size=16,
             max_length=48, progress=False, method="mezo", lr=1e-3, eval_every=3)


def train(out, **kw):
    return api.train({**SMALL, "output_dir": str(out), **kw}, loaded=tiny_random_model("causal", seed=0))


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    train(out, steps=6, save_every=3)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ZoftError, match=rf"{out}: holds an earlier run; continue it with --resume {out}, "
                                        r"or replace it with overwrite_output_dir=true"):
        train(out, steps=4, save_every=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_overwrite_starts_clean_and_keeps_the_users_own_files(tmp_path):
    out = tmp_path / "run"
    train(out, steps=6, save_every=3)
    (out / "notes.txt").write_text("mine")
    train(out, steps=4, save_every=2, overwrite_output_dir=True)
    assert [p.name for p in RunDir(out).checkpoints()] == ["checkpoint-4"]   # not the old checkpoint-6
    assert [r["step"] for r in RunDir(out).read_metrics()] == [1, 2, 3, 4]   # not appended to the old log
    assert (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite_output_dir"] is True


def test_resume_sweeps_the_temps_of_killed_writes(tmp_path):
    out = tmp_path / "run"
    train(out, steps=6, save_every=3)
    litter = [out / ".checkpoint-9.x1y2", out / ".best.a8b9", out / ".metrics.jsonl.k3j4",
              out / ".trajectory.safetensors.q1w2", out / ".curve.png.tmp"]
    for path in litter:
        path.mkdir() if "best" in path.name or "checkpoint" in path.name else path.write_bytes(b"half")
    (out / ".zoft-probe.kept").write_text("not ours to sweep")   # unknown hidden files stay
    api.train(resume=out, loaded=tiny_random_model("causal", seed=0))
    assert not any(path.exists() for path in litter)
    assert (out / ".zoft-probe.kept").exists()


def test_a_second_compare_into_the_same_folder_is_refused_then_replaced(tmp_path, capsys):
    out = tmp_path / "cmp"
    opts = ["model=tiny-llama", "task=sst2", "n_train=16", "n_dev=8", "n_eval=8", "max_length=48", "progress=false"]
    assert cli.main(["compare", "--methods", "zero-shot,icl", "--output-dir", str(out), *opts]) == 0
    capsys.readouterr()
    assert cli.main(["compare", "--methods", "zero-shot", "--output-dir", str(out), *opts]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier run; replace it with overwrite_output_dir=true" in err
    assert (out / "icl").is_dir()
    assert cli.main(["compare", "--methods", "zero-shot", "--output-dir", str(out), *opts,
                     "overwrite_output_dir=true"]) == 0
    assert not (out / "icl").exists()   # the earlier comparison's method folder is gone with it
    assert [r["method"] for r in json.loads((out / "comparison.json").read_text())] == ["zero-shot"]


def remote_code_model(folder):
    """A tiny Llama folder whose config names code of its own; running that code leaves RAN behind."""
    loaded = tiny_random_model("causal", seed=0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(folder / 'RAN')!r}).touch()\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    pass\n")
    return folder


@pytest.fixture
def run_asking_for_remote_code(tmp_path):
    model = remote_code_model(tmp_path / "model")
    run = tmp_path / "run"
    api.train({**SMALL, "method": "zero-shot", "model": str(model), "output_dir": str(run)})
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "trust_remote_code": True}))
    assert not (model / "RAN").exists()
    return run, model / "RAN"


def test_eval_never_takes_remote_code_from_a_run(run_asking_for_remote_code, capsys):
    run, ran = run_asking_for_remote_code
    assert cli.main(["eval", "--model", str(run)]) == 0
    assert not ran.exists()


def test_resume_never_takes_remote_code_from_a_run(run_asking_for_remote_code):
    run, ran = run_asking_for_remote_code
    api.train(resume=run)
    assert not ran.exists()


def test_score_and_serve_never_take_remote_code_from_a_run(run_asking_for_remote_code, tmp_path, monkeypatch):
    run, ran = run_asking_for_remote_code
    (tmp_path / "in.csv").write_text("id,text\n1,hello\n")
    with pytest.raises(ZoftError, match="not a scoring task"):   # after the model loaded
        cli.cmd_score(cli.build_parser().parse_args(
            ["score", "--model", str(run), "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.csv")]))
    assert not ran.exists()
    import uvicorn
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    cli.cmd_serve(cli.build_parser().parse_args(["serve", "--model", str(run)]))
    assert not ran.exists()


def test_the_callers_own_flag_does_turn_remote_code_on(run_asking_for_remote_code):
    run, ran = run_asking_for_remote_code
    with pytest.raises(ZoftError):   # this toy config class does not fit LlamaForCausalLM; it ran, though
        api.evaluate(run, trust_remote_code=True)
    assert ran.exists()


def test_eval_of_a_run_with_missing_truncated_or_corrupt_best_weights_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, steps=3)
    capsys.readouterr()
    weights = out / "best" / "trainable.safetensors"
    good = weights.read_bytes()
    for damage, expected in ((lambda: weights.unlink(), "missing"),
                             (lambda: weights.write_bytes(good[:len(good) // 2]), "truncated or corrupt"),
                             (lambda: weights.write_bytes(b"\x00" * 64), "truncated or corrupt")):
        weights.write_bytes(good)
        damage()
        assert cli.main(["eval", "--model", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zoft: error: {weights}: ") and expected in err and err.count("\n") == 1, err


def test_resume_from_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, steps=3)
    capsys.readouterr()
    (out / "checkpoint-3" / "trainable.safetensors").write_bytes(b"{not safetensors")
    assert cli.main(["train", "--resume", str(out)]) == 2
    start, *errors = capsys.readouterr().err.splitlines()   # the run it resumes, then one error line
    assert start.startswith("zoft: resume: ") and str(out) in start
    assert len(errors) == 1 and errors[0].startswith(f"zoft: error: {out}/checkpoint-3/trainable.safetensors: ")
    (out / "checkpoint-3" / "trainable.safetensors").unlink()
    (out / "checkpoint-3" / "trainer_state.json").write_text("[1, 2]")
    assert cli.main(["train", "--resume", str(out)]) == 2
    assert "trainable.safetensors: missing" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [("method: [unclosed", "not valid YAML"),
                                           ("- a\n- b\n", "a mapping of key: value, got list"),
                                           ("", "a mapping of key: value, got NoneType")])
def test_a_broken_run_config_is_one_line(tmp_path, capsys, text, expected):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    for argv in (["eval", "--model", str(out)], ["train", "--resume", str(out)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zoft: error: {out / 'config.yaml'}: ") and expected in err and err.count("\n") == 1


def test_read_and_write_of_a_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(2, {"w": torch.arange(3.0)}, {"step": 2}, {"m": torch.ones(2)})
    trainable, state, optimizer = run.load_checkpoint(tmp_path / "checkpoint-2")
    assert torch.equal(trainable["w"], torch.arange(3.0)) and state == {"step": 2}
    assert torch.equal(optimizer["m"], torch.ones(2))
    assert torch.equal(load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))["w"], torch.arange(3.0))

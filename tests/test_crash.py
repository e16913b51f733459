"""Crash tests: a run killed at a chosen point resumes to the same bits as an uninterrupted one.

The kill points are chosen, not timed: ``ZOFT_FAULT`` (zoft/faults.py) makes the training
process SIGKILL itself after step k, or before / half-way through / after its k-th write, or
makes a write fail with ENOSPC. Nothing here depends on how fast the machine is.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.errors import ZoftError
from zoft.faults import parse
from zoft.runs import OVERWRITE_MARKER, RunDir

STEPS = 12
COMMON = ["task=sst2", "n_train=32", "n_dev=16", "n_eval=32", "batch_size=8", "eval_batch_size=16",
          "max_length=48", "progress=false", "model=tiny-llama", f"steps={STEPS}", "eval_every=4", "save_every=2"]
CONFIGS = {
    "mezo-full-fused": ["method=mezo", "mode=full", "lr=1e-3"],
    "mezo-full-plain": ["method=mezo", "mode=full", "lr=1e-3", "fused=false"],
    "mezo-lora-fused": ["method=mezo", "mode=lora", "lr=1e-2"],
    "mezo-lora-plain": ["method=mezo", "mode=lora", "lr=1e-2", "fused=false"],
    "ft-full": ["method=ft", "mode=full", "lr=1e-3"],
}


def zoft(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZOFT_FAULT"}
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | ({"ZOFT_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "zoft", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def train(config: str, out, fault: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    return zoft("train", *COMMON, *CONFIGS[config], f"output_dir={out}", *extra, fault=fault)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each config, made once per module on first use."""
    made = {}

    def get(config: str):
        if config not in made:
            out = tmp_path_factory.mktemp("reference") / config
            done = train(config, out)
            assert done.returncode == 0, done.stderr[-3000:]
            made[config] = out
        return made[config]
    return get


def assert_same_run(a, b) -> None:
    """Same final weights and optimizer state, same best weights, same logged losses, no temps left."""
    for rel in (f"checkpoint-{STEPS}/trainable.safetensors", f"checkpoint-{STEPS}/optimizer.safetensors",
                "best/trainable.safetensors"):
        if not (a / rel).exists():
            assert not (b / rel).exists(), rel
            continue
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys(), rel
        assert all(torch.equal(x[k], y[k]) for k in x), f"{rel} differs"
    logged = [[{k: v for k, v in r.items() if k != "elapsed"} for r in RunDir(d).read_metrics()] for d in (a, b)]
    assert [r["step"] for r in logged[1]] == list(range(1, STEPS + 1))   # no step lost or logged twice
    assert logged[0] == logged[1]
    assert json.loads((a / "eval.json").read_text())["eval"] == json.loads((b / "eval.json").read_text())["eval"]
    assert [p.name for p in b.iterdir() if p.name.startswith(".")] == []   # the killed writes' temps are swept


def resume(out) -> None:
    done = zoft("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_kill_after_a_step_then_resume_is_bit_identical(tmp_path, reference, config):
    out = tmp_path / "killed"
    killed = train(config, out, "kill:step=5")   # after the dev eval of step 4 and checkpoint-4
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in RunDir(out).checkpoints()] == ["checkpoint-4"]
    resume(out)
    assert_same_run(reference(config), out)


@pytest.mark.parametrize("phase", ["before", "middle", "after"])
@pytest.mark.parametrize("target,nth", [("checkpoint-*", 2), ("best", 1), ("trajectory.safetensors", 2)])
def test_kill_inside_a_write_then_resume_is_bit_identical(tmp_path, reference, phase, target, nth):
    """checkpoint-4, best/ at step 4 or the trajectory at step 4, cut at each phase of the write."""
    out = tmp_path / "killed"
    killed = train("mezo-full-fused", out, f"kill:write={nth}:{phase}:{target}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    if phase == "middle":   # the half-written file or folder lies under a temp name, never under its own
        assert any(p.name.startswith(f".{target.rstrip('-*')}") for p in out.iterdir())
    resume(out)
    assert_same_run(reference("mezo-full-fused"), out)


@pytest.mark.parametrize("config", ["mezo-lora-plain", "ft-full"])
def test_a_resume_that_is_itself_killed_resumes(tmp_path, reference, config):
    out = tmp_path / "killed"
    assert train(config, out, "kill:step=3").returncode == -9
    again = zoft("train", "--resume", str(out), fault="kill:step=9")
    assert again.returncode == -9, again.stderr[-3000:]
    assert RunDir(out).checkpoints()[-1].name == "checkpoint-8"
    resume(out)
    assert_same_run(reference(config), out)


def test_a_kill_between_the_renames_of_a_replaced_folder_keeps_the_old_one(tmp_path):
    """Replacing best/ moves the old folder aside, then renames the new one in: a kill between the
    two leaves no best/ at all, and opening the run for resume must put the old one back."""
    script = ("import sys, torch; from zoft.runs import RunDir\n"
              "run = RunDir(sys.argv[1])\n"
              "for v in (1.0, 2.0): run.save_best({'w': torch.full((3,), v)}, {'step': int(v)})\n")
    env = {**os.environ, "ZOFT_FAULT": "kill:write=2:swap:best"}
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "best").exists() and (tmp_path / ".best.old").is_dir()
    RunDir(tmp_path).sweep()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert torch.equal(load_file(str(tmp_path / "best" / "trainable.safetensors"))["w"], torch.ones(3))


def test_disk_full_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, reference):
    out = tmp_path / "full"
    failed = train("mezo-full-fused", out, "enospc:write=2:middle:checkpoint-*")
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()   # the start line, a line per dev evaluation, then the error
    assert lines[0].startswith("zoft: train: ") and "Traceback" not in failed.stderr
    assert [line for line in lines if line.startswith("zoft: error: ")] == lines[-1:]
    assert lines[-1] == (f"zoft: error: {out}/checkpoint-4: cannot write: No space left on device; "
                         f"last good checkpoint: {out}/checkpoint-2")
    assert [p.name for p in RunDir(out).checkpoints()] == ["checkpoint-2"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []   # the half-written folder is gone
    resume(out)
    assert_same_run(reference("mezo-full-fused"), out)


def test_a_killed_overwrite_is_marked_and_refuses_to_resume(tmp_path, reference):
    out = tmp_path / "run"
    assert train("mezo-full-plain", out).returncode == 0
    killed = train("mezo-full-plain", out, f"kill:write=1:after:{OVERWRITE_MARKER}", "overwrite_output_dir=true")
    assert killed.returncode == -9
    assert (out / OVERWRITE_MARKER).exists()
    with pytest.raises(ZoftError, match="overwrite of this run directory was interrupted"):
        api.train(resume=out)
    again = train("mezo-full-plain", out)
    assert again.returncode == 2 and "overwrite_output_dir=true" in again.stderr
    assert train("mezo-full-plain", out, None, "overwrite_output_dir=true").returncode == 0
    assert_same_run(reference("mezo-full-plain"), out)


def test_fault_specs_parse_and_bad_ones_are_refused():
    assert parse("kill:step=5").step == 5
    fault = parse("enospc:write=3:after:checkpoint-*")
    assert (fault.action, fault.write, fault.phase, fault.match) == ("enospc", 3, "after", "checkpoint-*")
    for bad in ("kill", "explode:step=1", "kill:step=0", "kill:write=2:sideways", "kill:epoch=1"):
        with pytest.raises(ValueError):
            parse(bad)

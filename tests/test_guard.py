"""The divergence guard: noise is not a climb, a climb rolls back with the lr halved, too many stop in
one line, and a run killed after a rollback resumes to the bits of the uninterrupted run."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zoft import api
from zoft.cli import main
from zoft.guard import NORM_FACTOR, QUIET, REFERENCE_BATCHES, WARMUP, Guard, GuardState
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.training import DivergedError

from test_crash import train, zoft

SMALL = dict(method="mezo", model="tiny-llama", task="sst2", n_train=32, n_dev=16, n_eval=32, batch_size=8,
             eval_batch_size=16, max_length=48, progress=False, lr=1e-3,
             compute_dtype="fp32", distribution="gaussian")   # the step counts below follow these numerics


def feed(guard: Guard, losses) -> list[tuple[int, str]]:
    state, fired = GuardState(), []
    for i, loss in enumerate(losses):
        reason = guard.observe(state, loss)
        if reason:
            fired.append((i, reason))
    return fired


def test_noisy_flat_or_falling_losses_never_fire():
    rng = np.random.default_rng(0)
    flat = 0.7 + 0.25 * rng.standard_normal(2000)            # MeZO-like: batch losses ±35%
    falling = np.linspace(2.0, 0.3, 2000) * (1 + 0.3 * rng.standard_normal(2000))
    assert feed(Guard(1.5), flat) == []
    assert feed(Guard(1.5), falling) == []


def test_a_doubling_loss_fires_within_a_few_steps_and_metrics_use_the_same_margin():
    rng = np.random.default_rng(1)
    climb = np.concatenate([0.7 + 0.1 * rng.standard_normal(50), np.full(20, 1.6)])
    fired = feed(Guard(1.5), climb)
    # the fast EMA (~10 steps) crosses 1.5 × 0.7 after about 4 steps at 1.6
    assert fired and 52 <= fired[0][0] <= 56 and "loss EMA" in fired[0][1]
    # minus accuracy: best −0.8, limit −0.8 + 0.5·0.8 = −0.4
    assert feed(Guard(1.5), [-0.8] * 30 + [-0.5] * 30) == []
    assert feed(Guard(1.5), [-0.8] * 30 + [-0.1] * 30)
    assert feed(Guard(1.5), [0.7] * 5 + [math.nan])[0][1] == "loss is nan"
    assert feed(Guard(1.5), [0.7] * (WARMUP - 1) + [7.0]) == []   # no best yet: no climb to measure


def test_weights_that_blow_up_or_hold_inf_fire():
    guard, state = Guard(), GuardState()
    w = [torch.ones(10), torch.ones(3, 3)]
    assert guard.check_weights(state, w) is None and state.norm0 == pytest.approx(math.sqrt(19))
    assert guard.check_weights(state, [t * (NORM_FACTOR * 0.99) for t in w]) is None
    assert "weight norm" in guard.check_weights(state, [t * (NORM_FACTOR * 1.01) for t in w])
    assert "inf" in guard.check_weights(state, [w[0], torch.full((3, 3), math.inf)])


def test_a_climb_the_reference_batches_do_not_confirm_is_not_rolled_back_and_the_rule_rests():
    """Hard batches lift the loss EMA, but the weights are as good as at the last good state: the
    fixed reference batches say so, and the loss rule stays quiet for QUIET steps."""
    guard, state = Guard(1.5), GuardState(reference=0.50)
    losses = [0.7] * 30 + [2.0] * 40
    measured, fired = [], []
    for i, loss in enumerate(losses):
        reason = guard.observe(state, loss, reference=lambda: measured.append(i) or 0.70)   # ≤ 1.5 × 0.5
        fired += [i] if reason else []
    assert not fired
    assert state.false_alarms == len(measured) >= 2
    assert all(b - a == QUIET + 1 for a, b in zip(measured, measured[1:]))   # judged again after the rest
    assert state.last_check["reference"] == 0.70 and state.last_check["reference_limit"] == pytest.approx(0.75)
    assert state.best > 0.7   # measured from the level the reference vouched for
    # a run that settles at a higher training loss (LP-MeZO from the probe's head) is judged once,
    # not every QUIET steps for the rest of the run
    settled, checks = GuardState(reference=0.5), []
    for i, loss in enumerate([0.3] * 30 + [0.5] * 300):
        assert guard.observe(settled, loss, reference=lambda: checks.append(i) or 0.5) is None
    assert len(checks) == 1
    # the same climb with the reference up as well is a climb
    confirmed = GuardState(reference=0.50)
    reasons = [guard.observe(confirmed, loss, reference=lambda: 0.80) for loss in losses]
    fired = [r for r in reasons if r]
    assert fired and "reference batches' loss 0.8 > 0.75" in fired[0] and confirmed.false_alarms == 0
    # no reference at a good state yet, or none given: the loss rule alone, as before
    unjudged = GuardState()
    assert [i for i, loss in enumerate(losses) if guard.observe(unjudged, loss, lambda: 0.1)]


def test_a_reference_that_drifts_up_slowly_across_checkpoints_is_judged_from_its_lowest_value():
    """0.50 at the start, 0.70 and 0.90 at the next checkpoints: each within 1.5× of the one before,
    but 0.90 is past 1.5× the lowest, so a climb of the loss EMA there is confirmed."""
    guard, state = Guard(1.5), GuardState()
    for good in (0.50, 0.70, 0.45, 0.68):
        guard.record_reference(state, good)
    assert state.reference == 0.45
    reasons = [guard.observe(state, loss, reference=lambda: 0.90) for loss in [0.5] * 30 + [2.0] * 20]
    fired = [r for r in reasons if r]
    assert fired and "reference batches' loss 0.9 > 0.675" in fired[0]


def test_a_checkpoint_is_judged_on_the_reference_loss_from_its_lowest_value():
    guard, state = Guard(1.5), GuardState()
    assert guard.check_reference(state, 9.0) is None   # nothing to judge against before the start's reference
    guard.record_reference(state, 0.60)
    assert guard.check_reference(state, 9.0) is None   # nor in the first WARMUP steps, as for the loss rule
    state.seen = WARMUP
    guard.record_reference(state, 0.70)
    assert guard.check_reference(state, 0.89) is None   # under 1.5 × 0.60, the lowest: still good
    assert "reference batches' loss 0.91 > 0.9 (1.5× 0.6)" in guard.check_reference(state, 0.91)
    assert guard.check_reference(state, math.nan) is not None


def test_a_climb_the_loss_ema_misses_is_rolled_back_where_a_checkpoint_is_due(tmp_path, monkeypatch):
    """Only the reference batches read 3× where checkpoint-24 is due, so the loss EMA sees nothing
    (as in a slow climb under its limit). The weights there are not saved as a good state: the run
    goes back to checkpoint-20 with the lr halved, and checkpoint-24 is written after the redone steps."""
    from zoft.lm import CandidateScorer
    real, calls = CandidateScorer.loss, {"n": 0}
    at_checkpoint_24 = range(calls_before(25) - REFERENCE_BATCHES + 1, calls_before(25) + 1)

    def loss(self, enc, idx):
        calls["n"] += 1
        return real(self, enc, idx) * (3.0 if calls["n"] in at_checkpoint_24 else 1.0)
    monkeypatch.setattr(CandidateScorer, "loss", loss)
    out = tmp_path / "run"
    api.train({**SMALL, "steps": 28, "eval_every": 4, "output_dir": str(out)},
              loaded=tiny_random_model("causal", seed=0))
    records = RunDir(out).read_metrics()
    events = [r for r in records if "event" in r]
    assert [(e["step"], e["from_step"], e["lr_scale"]) for e in events] == [(20, 24, 0.5)]
    assert events[0]["reason"].startswith("at a checkpoint the reference batches' loss")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 29))
    logged = {r["step"]: r["reference"] for r in records if "reference" in r and "loss" in r}
    assert sorted(logged) == list(range(4, 29, 4)) and max(logged.values()) <= 1.5 * min(logged.values())
    state = json.loads((out / "checkpoint-28" / "trainer_state.json").read_text())["guard"]
    assert state["rollbacks"] == 1 and state["lr_scale"] == 0.5
    assert state["reference"] <= min(logged.values()) + 1e-6   # the lowest good one (the start's, if lower)


def test_hard_batches_do_not_roll_back_a_run_and_a_resume_after_the_check_is_bit_identical(tmp_path):
    """ZOFT_FAULT=hard: steps 21-30 read a 3× loss, the weights are fine. The guard checks the
    reference batches, logs the check, rolls nothing back; killed after it, the run resumes to the
    bits of the uninterrupted one."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = train("mezo-full-fused", straight, "hard:step=21", "steps=34")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rolled back" not in done.stderr and "no rollback" in done.stderr
    records = RunDir(straight).read_metrics()
    checks = [r for r in records if r.get("event") == "guard_check"]
    assert checks and all(r["verdict"] == "no climb" and r["reference"] <= r["reference_limit"] for r in checks)
    assert not [r for r in records if r.get("event") == "rollback"]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 35))
    cut = train("mezo-full-fused", killed, f"hard:step=21,kill:step={checks[0]['step'] + 3}", "steps=34")
    assert cut.returncode == -9, cut.stderr[-3000:]
    resumed = zoft("train", "--resume", str(killed), fault="hard:step=21")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_run(straight, killed, 34)


def calls_before(step: int, checkpoint_every: int = 4) -> int:
    """Loss calls of a SMALL MeZO run before step ``step`` (1-based): two per step, and the guard's
    reference batches at the start and at every checkpoint."""
    return REFERENCE_BATCHES * (1 + (step - 1) // checkpoint_every) + 2 * (step - 1)


def climbing_loss(monkeypatch, from_call: int):
    """Make the MeZO training loss read 10× from the ``from_call``-th forward on."""
    from zoft.lm import CandidateScorer
    real, calls = CandidateScorer.loss, {"n": 0}

    def loss(self, enc, idx):
        calls["n"] += 1
        return real(self, enc, idx) * (10.0 if calls["n"] >= from_call else 1.0)
    monkeypatch.setattr(CandidateScorer, "loss", loss)


def test_a_climb_that_goes_on_rolls_back_halving_the_lr_then_stops_in_one_line(tmp_path, monkeypatch, capsys, caplog):
    # two forwards a step: the climb starts in step 23's second forward; step 24 reads 10× in full.
    # After each rollback the loss stays 10× high, so the first step redone (21) climbs at once
    climbing_loss(monkeypatch, from_call=calls_before(WARMUP + 3) + 2)
    out = tmp_path / "run"
    argv = ["train", *[f"{k}={v}" for k, v in SMALL.items()], "steps=40", "eval_every=4", "guard_max_rollbacks=2",
            f"output_dir={out}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("zoft: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"zoft: error: {out}: training diverged: step 21: loss EMA")
    assert "after 2 rollbacks" in lines[0] and lines[0].endswith(f"last good checkpoint: {out}/checkpoint-20")
    assert caplog.text.count("rolled back to step 20, lr halved") == 2   # the console lines
    events = [r for r in RunDir(out).read_metrics() if r.get("event") == "rollback"]
    assert [(e["step"], e["from_step"], e["rollback"], e["lr_scale"]) for e in events] == [(20, 24, 1, 0.5),
                                                                                       (20, 21, 2, 0.25)]
    assert [e["lr"] for e in events] == pytest.approx([5e-4, 2.5e-4])
    assert max(r["step"] for r in RunDir(out).read_metrics()) == 20   # the abandoned steps are not logged


def test_a_nan_loss_rolls_back_and_the_run_finishes(tmp_path, monkeypatch):
    from zoft.lm import CandidateScorer
    real, calls = CandidateScorer.loss, {"n": 0}

    def loss(self, enc, idx):   # one NaN: step 7's first forward
        calls["n"] += 1
        return real(self, enc, idx) * (math.nan if calls["n"] == calls_before(7) + 1 else 1.0)
    monkeypatch.setattr(CandidateScorer, "loss", loss)
    out = tmp_path / "run"
    result = api.train({**SMALL, "steps": 10, "eval_every": 4, "output_dir": str(out)},
                       loaded=tiny_random_model("causal", seed=0))
    events = [r for r in RunDir(out).read_metrics() if "event" in r]
    assert [(e["step"], e["from_step"], e["reason"]) for e in events] == [(4, 7, "loss is nan")]
    assert result["best_dev"] is not None
    weights = load_file(str(out / "checkpoint-10" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_lr_1e30_behind_rmsnorm_is_caught_by_the_weight_norm_and_stops(tmp_path):
    """The loss stays finite (RMSNorm rescales the blown-up weights), so only the weights tell."""
    with pytest.raises(DivergedError, match=r"training diverged: step 10: weight norm .* after 3 rollbacks"):
        api.train({**SMALL, "lr": 1e30, "steps": 200, "eval_every": 100, "output_dir": str(tmp_path / "run")},
                  loaded=tiny_random_model("causal", seed=0))
    events = [r for r in RunDir(tmp_path / "run").read_metrics() if "event" in r]
    assert [(e["step"], e["from_step"], e["lr_scale"]) for e in events] == [(0, 10, 0.5), (0, 10, 0.25), (0, 10, 0.125)]


def test_without_the_guard_the_same_climb_runs_to_the_end(tmp_path, monkeypatch):
    climbing_loss(monkeypatch, from_call=calls_before(WARMUP + 3) + 2)
    api.train({**SMALL, "steps": 28, "eval_every": 4, "guard": False, "output_dir": str(tmp_path / "run")},
              loaded=tiny_random_model("causal", seed=0))
    assert [r["step"] for r in RunDir(tmp_path / "run").read_metrics()] == list(range(1, 29))


def test_a_rollback_restores_the_last_good_weights_and_the_run_goes_on_at_half_the_lr(tmp_path, monkeypatch):
    """The climb stops once the lr is halved (ZOFT_FAULT=climb, in process): one rollback, to
    checkpoint-24, then the steps after it use lr/2."""
    from zoft import faults
    monkeypatch.setattr(faults, "_CLIMB", faults.parse("climb:step=25"))
    out = tmp_path / "run"
    api.train({**SMALL, "steps": 30, "eval_every": 4, "save_every": 6, "output_dir": str(out)},
              loaded=tiny_random_model("causal", seed=0))
    records = RunDir(out).read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 31))
    assert [(r["step"], r["from_step"]) for r in records if "event" in r] == [(24, 25)]
    assert {r["lr"] for r in records if "loss" in r and r["step"] > 24} == {5e-4}
    assert {r["lr"] for r in records if "loss" in r and r["step"] <= 24} == {1e-3}
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())["guard"]
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1


def same_run(a, b, steps: int) -> None:
    """Same final weights and optimizer state, best weights, logged records and eval."""
    for rel in (f"checkpoint-{steps}/trainable.safetensors", f"checkpoint-{steps}/optimizer.safetensors",
                "best/trainable.safetensors", "trajectory.safetensors"):
        assert (a / rel).exists() == (b / rel).exists(), rel
        if (a / rel).exists():
            x, y = load_file(str(a / rel)), load_file(str(b / rel))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{rel} differs"
    logged = [[{k: v for k, v in r.items() if k != "elapsed"} for r in RunDir(d).read_metrics()] for d in (a, b)]
    assert logged[0] == logged[1]
    assert json.loads((a / "eval.json").read_text())["eval"] == json.loads((b / "eval.json").read_text())["eval"]


@pytest.mark.parametrize("config,kill_at", [("mezo-full-fused", 22), ("mezo-lora-plain", 24)])
def test_a_run_killed_after_a_rollback_resumes_bit_identical(tmp_path, config, kill_at):
    """The climb at step 21 (the first step after the guard's warm-up) rolls back to checkpoint-20;
    the kill comes after the redone steps, before or after checkpoint-22 records lr_scale 0.5."""
    steps = ("steps=26",)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = train(config, straight, "climb:step=21", *steps)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("rolled back to step 20") == 1
    cut = train(config, killed, f"climb:step=21,kill:step={kill_at}", *steps)
    assert cut.returncode == -9, cut.stderr[-3000:]
    assert "rolled back to step 20" in cut.stderr
    resumed = zoft("train", "--resume", str(killed), fault="climb:step=21")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_run(straight, killed, 26)
    records = RunDir(killed).read_metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 27))
    assert [(r["step"], r["from_step"]) for r in records if r.get("event") == "rollback"] == [(20, 21)]
    lrs = load_file(str(killed / "trajectory.safetensors"))["lr"].tolist()
    assert len(lrs) == 26 and lrs[20:] == [lrs[0] / 2] * 6   # the trajectory holds the path kept, at lr/2

"""Shared-prefix scoring equals the unshared path: log-probs, losses, FT gradients, MeZO steps.

Tolerance: fp32 log-probs within 1e-4 (measured: below 1e-6 on tiny-llama); the shared path
only changes how the same function is computed (the header's keys and values once per group).
"""
import json

import pytest
import torch

from zoft import api
from zoft.adapters import apply_mode
from zoft.config import Config
from zoft.errors import ZoftError
from zoft.lm import CandidateScorer
from zoft.models import tiny_random_model
from zoft.tasks import load_task
from zoft.tasks.readers import data_dir
from zoft.tasks.rubric import ScoringTask
from zoft.tasks.rubric.data import Response, ScoringItem

TOL = 1e-4
DATA = data_dir()
needs_asap = pytest.mark.skipif(DATA is None or not (DATA / "asap-sas").is_dir(),
                                reason="shared data folder not found (set ZOFT_DATA_DIR)")


def two_item_task() -> ScoringTask:
    """Two items with different headers, responses of different lengths, one item with a single response."""
    items = [ScoringItem(f"q{k}", f"Why does the {name} sink or float in water ?", f"Score 1 if it says {name} .",
                         [], ["0", "1"]) for k, name in enumerate(["stone", "leaf", "boat"])]
    texts = ["it is heavy", "the stone is dense so it sinks", "no idea", "air inside the leaf keeps it up",
             "it floats", "boats displace water"]
    responses = [Response(str(i), t, i % 2, item_id=f"q{min(i // 2, 2)}") for i, t in enumerate(texts)]
    return ScoringTask("toy", items, responses, responses, same_split=True)


def scorers(model, tokenizer, max_length=512, **kwargs):
    shared = CandidateScorer(model, tokenizer, "classification", max_length=max_length, shared_prefix="on", **kwargs)
    whole = CandidateScorer(model, tokenizer, "classification", max_length=max_length, shared_prefix="off", **kwargs)
    return shared, whole


def count_tokens(model):
    """A list that collects the number of input tokens of every embedding call."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen


@needs_asap
@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_shared_log_probs_equal_unshared_on_asap_prompts(mode):
    loaded = tiny_random_model("causal", seed=0)
    examples = load_task("asap-1").get_data(n_train=6, n_dev=2, n_eval=2, seed=0).train
    model = apply_mode(loaded.model, mode, num_virtual_tokens=3)
    for name, p in model.named_parameters():   # LoRA B starts at zero: give the adapter an effect
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    shared, whole = scorers(model, loaded.tokenizer)
    enc_s, enc_w = shared.encode(examples), whole.encode(examples)
    assert enc_s.context_ids == enc_w.context_ids                # sharing never changes the tokens
    assert enc_s.header_groups == [0] * 6 and enc_s.header_lens[0] > 200
    idx = list(range(6))
    tokens = count_tokens(model.get_base_model() if mode != "full" else model)
    with torch.no_grad():
        got = shared.candidate_logprobs(enc_s, idx)[0]
        ran_shared = sum(tokens)
        tokens.clear()
        if mode == "prefix":   # peft's prefix positions count left padding: compare unpadded rows
            want = torch.cat([whole.candidate_logprobs(enc_w, [i])[0] for i in idx])
        else:
            want = whole.candidate_logprobs(enc_w, idx)[0]
        tokens.clear()
        whole.candidate_logprobs(enc_w, idx)
        ran_whole = sum(tokens)
    assert torch.allclose(got, want, atol=TOL), (got - want).abs().max()
    assert ran_shared < ran_whole / 2     # the header (about 300 tokens here) ran once, not 6 times


def test_mixed_batch_keeps_row_order_and_falls_back_for_singletons_and_truncated_rows():
    task = two_item_task()
    examples = task.load_split("train")
    loaded = tiny_random_model("causal", seed=2, vocab_texts=[ex.context for ex in examples])
    shared, whole = scorers(loaded.model, loaded.tokenizer)
    enc_s = shared.encode(examples)
    assert enc_s.header_groups == [0, 0, 1, 1, 2, 2]
    idx = [5, 0, 2, 3, 1]       # item q2 has one row in this batch: read whole
    with torch.no_grad():
        got = shared.candidate_logprobs(enc_s, idx)[0]
        want = whole.candidate_logprobs(whole.encode(examples), idx)[0]
        gold_got = shared.candidate_logprobs(enc_s, idx, only_target=True)[0]      # the continuation path
        gold_want = whole.candidate_logprobs(whole.encode(examples), idx, only_target=True)[0]
    assert torch.allclose(got, want, atol=TOL) and torch.allclose(gold_got, gold_want, atol=TOL)
    assert not torch.allclose(got[0], got[1], atol=1e-3)   # rows differ, so a mix-up would show
    # a context cut from the left loses the start of its header: it is not shared
    short, _ = scorers(loaded.model, loaded.tokenizer, max_length=12)
    assert short.encode(examples).header_groups == [-1] * 6


def test_ft_gradients_flow_through_the_shared_header():
    task = two_item_task()
    examples = task.load_split("train")[:4]
    grads = {}
    for share in ("on", "off"):
        loaded = tiny_random_model("causal", seed=3, vocab_texts=[ex.context for ex in examples])
        scorer = CandidateScorer(loaded.model, loaded.tokenizer, "classification", max_length=512,
                                 shared_prefix=share)
        enc = scorer.encode(examples)
        loss = scorer.loss(enc, [0, 1, 2, 3])
        loss.backward()
        grads[share] = {n: p.grad.clone() for n, p in loaded.model.named_parameters()}
    for name, g in grads["off"].items():
        assert torch.allclose(grads["on"][name], g, atol=TOL, rtol=1e-3), name
    # the first layer's key projection sees header tokens only through the shared forward
    assert grads["on"]["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_frozen_weights_run_each_header_once_across_batches():
    task = two_item_task()
    examples = task.load_split("train")
    loaded = tiny_random_model("causal", seed=2, vocab_texts=[ex.context for ex in examples])
    shared, whole = scorers(loaded.model, loaded.tokenizer)
    enc = shared.encode(examples)
    tokens = count_tokens(loaded.model)
    with torch.no_grad(), shared.frozen_weights():
        first = shared.candidate_logprobs(enc, [0, 1])[0]
        header_and_rows = sum(tokens)
        tokens.clear()
        again = shared.candidate_logprobs(enc, [1])[0]   # one row, its header's cache kept
        rows_only = sum(tokens)
        want = whole.candidate_logprobs(whole.encode(examples), [0, 1])[0]
    assert torch.allclose(first, want, atol=TOL) and torch.allclose(again, want[1:], atol=TOL)
    assert rows_only == len(loaded.tokenizer(examples[1].context).input_ids) - enc.header_lens[1]
    assert header_and_rows > rows_only + enc.header_lens[0]


def test_linear_probe_features_equal_unshared_and_the_header_runs_once_per_group():
    task = two_item_task()
    examples = task.load_split("train")
    loaded = tiny_random_model("causal", seed=2, vocab_texts=[ex.context for ex in examples])
    shared, whole = scorers(loaded.model, loaded.tokenizer)
    enc_shared, enc_whole = shared.encode(examples), whole.encode(examples)
    idx = [5, 0, 3, 1, 4, 2]   # groups out of order; item q2 has a row of its own in this batch
    seen = count_tokens(loaded.model)
    got = shared.features(enc_shared, idx)
    shared_tokens, seen[:] = sum(seen), []
    want = whole.features(enc_whole, idx)
    assert got.shape == want.shape == (6, loaded.model.config.hidden_size)
    assert torch.allclose(got, want, atol=TOL)
    assert shared_tokens < sum(seen)


def test_bf16_compute_shares_too():
    task = two_item_task()
    examples = task.load_split("train")
    loaded = tiny_random_model("causal", seed=2, vocab_texts=[ex.context for ex in examples])
    shared, whole = scorers(loaded.model, loaded.tokenizer, compute_dtype="bf16")
    with torch.no_grad():
        got = shared.candidate_logprobs(shared.encode(examples), [0, 1, 2, 3])[0]
        want = whole.candidate_logprobs(whole.encode(examples), [0, 1, 2, 3])[0]
    assert torch.allclose(got, want, atol=5e-2)   # bf16 matmuls: rounding of a different summation order


def test_shared_prefix_on_is_refused_where_it_cannot_apply():
    masked = tiny_random_model("masked", seed=0)
    with pytest.raises(ZoftError, match="shared_prefix=on cannot apply"):
        CandidateScorer(masked.model, masked.tokenizer, "classification", is_masked_lm=True, shared_prefix="on")
    assert not CandidateScorer(masked.model, masked.tokenizer, "classification", is_masked_lm=True).shares_prefix
    with pytest.raises(ZoftError, match="unknown shared_prefix 'maybe'"):
        Config(shared_prefix="maybe").validate()


@needs_asap
def test_mezo_steps_match_with_and_without_sharing(tmp_path):
    """MeZO runs the header once per forward (weights change between L+ and L−) and gets the same losses."""
    losses = {}
    for share in ("auto", "off"):
        out = tmp_path / share
        api.train(method="mezo", task="asap-1", model="tiny-llama", steps=3, batch_size=4, lr=1e-2, eps=1e-2,
                  n_train=8, n_dev=4, n_eval=4, eval_every=3, progress=False, shared_prefix=share,
                  output_dir=str(out))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[share] = [x["loss"] for x in lines if "loss" in x]
    assert len(losses["auto"]) == 3
    assert losses["auto"] == pytest.approx(losses["off"], abs=TOL)


def test_serve_runs_an_items_header_once_for_all_requests():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from zoft.scoring.serve import create_app
    from zoft.tasks.rubric.prompts import system_prompt, user_prompt

    task = two_item_task()
    item = task.items["q0"]
    loaded = tiny_random_model("causal", seed=2, vocab_texts=[ex.context for ex in task.load_split("train")])
    shared, whole = scorers(loaded.model, loaded.tokenizer)
    header = task.header(item)
    apps = {"shared": create_app(shared, ["0", "1"], task.context_from_chat, "m", headers=list(task.header(i)
                                 for i in task.items.values())),
            "whole": create_app(whole, ["0", "1"], task.context_from_chat, "m")}
    tokens = count_tokens(loaded.model)

    def ask(app, text):
        messages = [{"role": "system", "content": system_prompt(item)},
                    {"role": "user", "content": user_prompt(item, Response("x", text, None, item_id="q0"))}]
        reply = TestClient(app).post("/v1/chat/completions", json={"model": "m", "messages": messages,
                                                                   "logprobs": True}).json()
        return {e["token"]: e["logprob"] for e in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}

    with shared.frozen_weights():
        first = ask(apps["shared"], "it is heavy")
        header_and_row = sum(tokens)
        tokens.clear()
        second = ask(apps["shared"], "the stone is dense so it sinks")
        row_only = sum(tokens)
    n_header = len(loaded.tokenizer(header).input_ids)
    assert header_and_row > n_header and row_only < header_and_row - n_header + 10
    assert first == pytest.approx(ask(apps["whole"], "it is heavy"), abs=TOL)
    assert second == pytest.approx(ask(apps["whole"], "the stone is dense so it sinks"), abs=TOL)

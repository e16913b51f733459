"""lm-cls: a classification head on a causal LM, on tiny-llama and small ASAP samples.

Kept fast on a shared CPU: the 2-layer tiny Llama, short inputs, a handful of steps.
"""
import pytest
import torch
from safetensors.torch import load_file

from zoft.config import load_config
from zoft.errors import ZoftError
from zoft.methods import get_method
from zoft.methods import lm_classifier as lmcls
from zoft.methods.common import Setup, prepare
from zoft.models import tiny_random_model
from zoft.runs import RunDir
from zoft.tasks import load_task

SMALL = {"method": "lm-cls", "model": "tiny-llama", "task": "asap-10", "n_train": 16, "n_dev": 8, "n_eval": 16,
         "batch_size": 8, "eval_batch_size": 16, "max_length": 48, "lr": 1e-3, "progress": False}


@pytest.fixture(autouse=True)
def offline(asap_offline):
    """Every test here reads ASAP-SAS from the shared folder, with the hub off (tests/conftest.py)."""


def asap_setup(**overrides) -> Setup:
    """The task data of SMALL (plus overrides) as a run loads it, with a tiny random LM."""
    return prepare(load_config(overrides={**SMALL, **overrides}), loaded=tiny_random_model("causal"))


def test_registered_with_full_and_lora():
    method = get_method("lm-cls")
    assert method.run is lmcls.run and method.modes == ("full", "lora") and method.loads_lm and method.trains


def test_classifier_keeps_the_lm_body_and_reads_the_last_real_token():
    lm = tiny_random_model("causal").model
    clf = lmcls.classifier_from_lm(lm, num_labels=3, seed=0)
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    assert all(torch.equal(clf.state_dict()[k], v) for k, v in body.items())
    assert tuple(clf.score.weight.shape) == (3, lm.config.hidden_size)
    # independent computation: the LM's own final hidden state at each row's last real token, times the head
    pad = lm.config.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad, pad]])
    mask = (ids != pad).long()
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([hidden[0, 3], hidden[1, 1]]) @ clf.score.weight.T
        got = clf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    again = lmcls.classifier_from_lm(lm, num_labels=3, seed=0)
    assert torch.equal(again.score.weight, clf.score.weight)   # the head's init is a function of the seed


def test_inputs_are_the_response_text_without_segment_ids():
    setup = asap_setup()
    scorer = lmcls.LMClassifierScorer(setup.loaded.model, setup.loaded.tokenizer, setup.task, 48)
    enc = scorer.encode(setup.data.train[:3])
    assert enc.token_type_ids is None
    expected = setup.loaded.tokenizer([ex.doc["text"] for ex in setup.data.train[:3]], truncation=True,
                                      max_length=48)["input_ids"]
    assert enc.input_ids == expected
    assert enc.labels == [ex.target for ex in setup.data.train[:3]]


def test_full_mode_lowers_the_loss_on_a_fixed_batch(tmp_path):
    setup = asap_setup(n_train=8, n_dev=4, n_eval=4, batch_size=8, steps=8, eval_every=8, lr=3e-3, load_best=False)
    lmcls.run(setup, RunDir(tmp_path))
    losses = [r["loss"] for r in RunDir(tmp_path).read_metrics()]
    assert len(losses) == 8 and all(0 < x < 10 for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    tensors = load_file(str(tmp_path / "checkpoint-8" / "trainable.safetensors"))
    assert "score.weight" in tensors and "model.embed_tokens.weight" in tensors
    assert not any(k.startswith("lm_head") for k in tensors)


def test_lora_trains_the_adapters_and_the_whole_head_only(tmp_path):
    setup = asap_setup(mode="lora", steps=2, eval_every=2)
    lmcls.run(setup, RunDir(tmp_path))
    tensors = load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    head = [k for k in tensors if "score" in k]
    assert head and all("modules_to_save" in k for k in head)
    assert not any("embed_tokens" in k or "mlp" in k and "lora" not in k for k in tensors)


def test_masked_lm_and_non_classification_tasks_are_errors(tmp_path):
    setup = asap_setup()
    setup.loaded = tiny_random_model("masked")
    with pytest.raises(ZoftError, match="causal LM.*bert-cls"):
        lmcls.run(setup, RunDir(tmp_path))
    task = load_task("copa")
    setup = Setup(load_config(overrides={**SMALL, "task": "copa"}), task,
                  task.get_data(n_train=4, n_dev=2, n_eval=2, seed=0), tiny_random_model("causal"))
    with pytest.raises(ZoftError, match="lm-cls needs a classification task"):
        lmcls.run(setup, RunDir(tmp_path))
    assert not (tmp_path / "eval.json").exists()


def test_freeze_embeddings_keeps_the_vocabulary_matrix_and_the_run_reloads(tmp_path):
    """freeze_embeddings=true: the input embeddings stay bit-identical to the LM's and are left out of
    the checkpoint while the body and head train; `zoft eval` rebuilds the same model and gets
    eval.json's numbers again."""
    import zoft.api

    lm = tiny_random_model("causal")
    pretrained = lm.model.get_input_embeddings().weight.detach().clone()
    result = zoft.api.train(**{**SMALL, "steps": 4, "eval_every": 2, "lr": 3e-3}, freeze_embeddings=True,
                            output_dir=str(tmp_path), loaded=lm)
    tensors = load_file(str(tmp_path / "checkpoint-4" / "trainable.safetensors"))
    assert "score.weight" in tensors and not any("embed_tokens" in k for k in tensors)
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(tensors[layer], tiny_random_model("causal").model.state_dict()[layer])   # the body trained
    assert torch.equal(lm.model.get_input_embeddings().weight, pretrained)   # no step touched the vocabulary
    again = zoft.api.evaluate(str(tmp_path), task="asap-10")
    assert again["eval"] == pytest.approx(result["eval"], abs=1e-12)


def test_freeze_embeddings_is_refused_where_there_is_no_head():
    with pytest.raises(ZoftError, match="freeze_embeddings is for lm-cls and bert-cls.*method=mezo"):
        load_config(overrides={**SMALL, "method": "mezo", "freeze_embeddings": True})
    cfg = load_config(overrides={**SMALL, "method": "ensemble", "freeze_embeddings": True,
                                 "members": [{"method": "bert-cls"}, {"method": "lm-cls"}]})
    assert all(member.freeze_embeddings for _, member in cfg.member_configs())   # the ensemble's reaches its members


def test_freeze_layers_keeps_the_bottom_blocks_and_backward_stops_above_them(tmp_path):
    """freeze_layers=1 on the 2-block tiny Llama: the embeddings and block 0 get no gradient and stay as
    pretrained, the backward pass never reaches block 0 (its output needs no gradient), the gradients
    of block 1 and the head are those of the whole model's autograd, and `zoft eval` reloads the run."""
    import zoft.api

    lm = tiny_random_model("causal").model
    cfg = load_config(overrides={**SMALL, "freeze_layers": 1})
    frozen = lmcls.with_mode(lmcls.classifier_from_lm(lm, 3, seed=0), cfg)
    whole = lmcls.with_mode(lmcls.classifier_from_lm(lm, 3, seed=0), load_config(overrides=SMALL))
    trained = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.1.", "model.norm.", "score.")) for n in trained)
    assert {n for n, _ in frozen.named_parameters()} - trained >= {"model.embed_tokens.weight",
                                                                   "model.layers.0.mlp.up_proj.weight"}
    outputs_need_grad = []
    frozen.model.layers[0].register_forward_hook(lambda m, i, out: outputs_need_grad.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = torch.tensor([0, 2])
    for model in (frozen, whole):
        model(input_ids=ids, labels=labels).loss.backward()
    assert outputs_need_grad == [False]
    wholes = dict(whole.named_parameters())
    for name, param in frozen.named_parameters():
        if name in trained:
            torch.testing.assert_close(param.grad, wholes[name].grad, rtol=1e-5, atol=1e-7)
        else:
            assert param.grad is None

    loaded = tiny_random_model("causal")
    pretrained_block0 = loaded.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = zoft.api.train(**{**SMALL, "steps": 4, "eval_every": 2, "lr": 3e-3}, freeze_layers=1,
                            output_dir=str(tmp_path), loaded=loaded)
    tensors = load_file(str(tmp_path / "checkpoint-4" / "trainable.safetensors"))
    assert "score.weight" in tensors and "model.layers.1.mlp.up_proj.weight" in tensors
    assert not any(k.startswith(("model.embed_tokens", "model.layers.0.")) for k in tensors)
    assert torch.equal(loaded.model.model.layers[0].mlp.up_proj.weight, pretrained_block0)
    again = zoft.api.evaluate(str(tmp_path), task="asap-10")
    assert again["eval"] == pytest.approx(result["eval"], abs=1e-12)


def test_freeze_layers_is_refused_outside_full_mode_heads_and_keeps_the_last_block():
    with pytest.raises(ZoftError, match="freeze_layers is for lm-cls and bert-cls in mode=full.*method=mezo"):
        load_config(overrides={**SMALL, "method": "mezo", "freeze_layers": 1})
    with pytest.raises(ZoftError, match="freeze_layers is for .* mode=lora"):
        load_config(overrides={**SMALL, "mode": "lora", "freeze_layers": 1})
    with pytest.raises(ZoftError, match="freeze_layers must be >= 0"):
        load_config(overrides={**SMALL, "freeze_layers": -1})
    lm = tiny_random_model("causal").model
    with pytest.warns(UserWarning, match="freeze_layers=6, but LlamaForSequenceClassification has 2 blocks"):
        model = lmcls.with_mode(lmcls.classifier_from_lm(lm, 3), load_config(overrides={**SMALL, "freeze_layers": 6}))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}   # a recipe for 18 blocks on 2: the last trains
    assert any(n.startswith("model.layers.1.") for n in trained)
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in trained)
    from zoft.methods.encoder_classifier import freeze_bottom
    with pytest.raises(ZoftError, match="no numbered transformer blocks"):
        freeze_bottom(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)


def test_speed_keys_resume_exactly_and_track_the_plain_run(tmp_path):
    """group_by_length, adamw_fused and micro_batch_size together: a run cut after step 2 and resumed
    ends on the same bits as the whole run (batches stay a function of (seed, step); the fused AdamW's
    moments and step count survive the checkpoint), and its weights stay within float rounding of the
    run with one piece per batch and the default AdamW loop."""
    few = dict(n_train=24, n_dev=4, n_eval=4, batch_size=4, eval_every=2, lr=1e-3, load_best=False,
               compute_dtype="fp32")   # bf16 rounds each piece differently: the comparison wants fp32
    fast = dict(few, group_by_length=True, adamw_fused=True, micro_batch_size=3)
    lmcls.run(asap_setup(**fast, steps=4), RunDir(tmp_path / "whole"))
    lmcls.run(asap_setup(**fast, steps=2), RunDir(tmp_path / "cut"))             # "killed" after step 2
    lmcls.run(asap_setup(**fast, steps=4), RunDir(tmp_path / "cut"), resume=True)
    whole = load_file(str(tmp_path / "whole" / "checkpoint-4" / "trainable.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "checkpoint-4" / "trainable.safetensors"))
    assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)
    state = load_file(str(tmp_path / "cut" / "checkpoint-4" / "optimizer.safetensors"))
    assert state and all(v.item() == 4 for k, v in state.items() if k.endswith(".step"))

    lmcls.run(asap_setup(**few, group_by_length=True, steps=4), RunDir(tmp_path / "loop"))
    loop = load_file(str(tmp_path / "loop" / "checkpoint-4" / "trainable.safetensors"))
    start = tiny_random_model("causal").model.state_dict()
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(whole[layer], start[layer])   # it trained
    assert all(torch.allclose(whole[k], loop[k], rtol=0, atol=1e-5) for k in whole)


def test_group_by_length_batches_pad_less_and_cover_each_epoch_once():
    from zoft.training import batch_indices

    lengths = [int(x) for x in torch.randint(5, 200, (97,), generator=torch.Generator().manual_seed(0))]
    per_epoch = 97 // 8

    def padded(step, grouped):
        idx = batch_indices(97, 8, 3, step, lengths if grouped else None)
        return len(idx) * max(lengths[i] for i in idx)

    grouped = [batch_indices(97, 8, 3, s, lengths) for s in range(2 * per_epoch)]
    assert grouped == [batch_indices(97, 8, 3, s, lengths) for s in range(2 * per_epoch)]   # a pure function
    for epoch in range(2):   # no example twice in an epoch
        seen = [i for b in grouped[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b]
        assert len(seen) == len(set(seen)) == per_epoch * 8
    assert grouped[:per_epoch] != grouped[per_epoch:]   # each epoch its own order
    tokens = [sum(padded(s, g) for s in range(per_epoch)) for g in (True, False)]
    assert tokens[0] < 0.75 * tokens[1], tokens


def test_backprop_only_keys_are_refused_for_zo_methods():
    for key, value in (("group_by_length", True), ("adamw_fused", True), ("micro_batch_size", 4)):
        with pytest.raises(ZoftError, match=f"{key} is for the backprop methods.*method=mezo"):
            load_config(overrides={**SMALL, "method": "mezo", key: value})
    with pytest.raises(ZoftError, match="micro_batch_size must be >= 1"):
        load_config(overrides={**SMALL, "micro_batch_size": 0})


def test_micro_batches_give_the_whole_batch_loss_and_gradient():
    """backward_in_micro_batches against one backward of the whole batch, float64 weights (the loss
    itself is taken in float32, as batch_loss does): same loss, same gradient, whatever the pieces
    (the batch mixes short and long responses, so each piece pads differently)."""
    from zoft.adapters import named_trainable
    from zoft.methods.finetune import backward_in_micro_batches

    setup = asap_setup(n_train=12)
    scorer = lmcls._classifier(setup, len(setup.task.label_words))
    scorer.model.double()
    enc = scorer.encode(setup.data.train)
    lengths = [len(ids) for ids in enc.input_ids]
    idx = [3, 0, 7, 11, 5, 2, 9]
    assert len({lengths[i] for i in idx}) > 2

    def run(size):
        scorer.model.zero_grad(set_to_none=True)
        loss = backward_in_micro_batches(lambda chunk: scorer.loss(enc, chunk), idx, lengths, size)
        return loss, {k: p.grad.clone() for k, p in named_trainable(scorer.model).items()}

    whole_loss, whole = run(None)
    for size in (1, 2, 3, 7):
        loss, grads = run(size)
        assert loss == pytest.approx(whole_loss, rel=1e-6)
        assert all(torch.allclose(grads[k], whole[k], rtol=1e-5, atol=1e-9) for k in whole), size


def test_decision_expected_reports_the_level_nearest_the_expected_score(tmp_path):
    """decision=expected end to end: eval.json's predictions are the levels nearest each response's
    expected score under its stored probabilities, its confidences those levels' probabilities; dev
    selection and `zoft eval` use the same rule; a task without ordered levels is refused at once."""
    import zoft.api

    lm = tiny_random_model("causal")
    result = zoft.api.train(**{**SMALL, "steps": 2, "eval_every": 1, "lr": 3e-3}, decision="expected",
                            output_dir=str(tmp_path), loaded=lm)
    out = result["eval_outputs"]
    for probs, pred, conf in zip(out["probabilities"], out["predictions"], out["confidences"]):
        mean = sum(k * p for k, p in enumerate(probs)) / sum(probs)
        assert pred == min(range(len(probs)), key=lambda k: abs(k - mean))
        assert conf == pytest.approx(probs[pred], abs=1e-6)
    again = zoft.api.evaluate(str(tmp_path), task="asap-10")
    assert again["eval"] == pytest.approx(result["eval"], abs=1e-12)
    with pytest.raises(ZoftError, match="decision=expected needs a scoring task.*'sst2'"):
        zoft.api.train(**{**SMALL, "task": "sst2", "steps": 1}, decision="expected", output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()

"""ZOTrainer: MeZO through transformers' Trainer, against a plain MeZO loop and across a resume."""
from __future__ import annotations

import tomllib
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from zoft.errors import ZoftError
from zoft.integrations.hf import TESTED_TRANSFORMERS, ZOTrainer
from zoft.optim import MeZO

VOCAB, SEQ = 256, 12


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random Llama of about 100K parameters."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def token_rows(n: int, same: bool = False) -> datasets.Dataset:
    ids = torch.randint(0, VOCAB, (1 if same else n, SEQ), generator=torch.Generator().manual_seed(1))
    rows = ids.expand(n, SEQ).tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def arguments(out: Path, **over) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-2, seed=3, use_cpu=True, report_to="none",
                    disable_tqdm=True, save_strategy="no")
    return TrainingArguments(str(out), **{**settings, **over})


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trains_as_a_plain_mezo_loop_does(tmp_path):
    """On a batch of identical rows (so the sampler's order cannot matter), 3 ZOTrainer steps with
    a constant lr equal 3 MeZO.step calls with args' lr and seed, bit for bit; the logs carry the
    loss and the projected gradient, and no .grad is made."""
    rows = token_rows(8, same=True)
    model = tiny_llama()
    before = weights(model)
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, max_steps=3, logging_steps=1,
                                                     lr_scheduler_type="constant"),
                        train_dataset=rows, zo_options={"eps": 1e-2})
    # the model's own mean loss: how Trainer counts tokens for num_items_in_batch changed across
    # transformers versions (5.0 counts every label, 5.24 the shifted ones), and MeZO is under test here
    trainer.model_accepts_loss_kwargs = False
    trainer.train()

    reference = tiny_llama()
    batch = torch.tensor(rows["input_ids"][:4])
    opt = MeZO(reference.parameters(), lr=1e-2, eps=1e-2, seed=3)
    reference.eval()
    losses = [float(opt.step(lambda: reference(input_ids=batch, labels=batch).loss)) for _ in range(3)]

    after = weights(model)
    for name, value in weights(reference).items():
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], before[n]) for n in after)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert [entry["loss"] for entry in logs] == pytest.approx(losses, rel=1e-6)
    assert all("projected_grad" in entry and "grad_norm" not in entry for entry in logs)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("zo_options, weight_decay", [({}, 0.0), ({"optimizer": "zo-sgd-momentum"}, 0.1),
                                                      ({"fused": True}, 0.0)],
                         ids=["mezo", "momentum-two-groups", "fused"])
def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path, zo_options, weight_decay):
    """6 steps (saving at 3) against 3 resumed from checkpoint-3 into a model of another init:
    the same weights bit for bit. 4 batches an epoch, so the resumed half crosses an epoch."""
    rows = token_rows(16)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, weight_decay=weight_decay, logging_steps=3)

    straight = ZOTrainer(model=tiny_llama(), args=arguments(tmp_path / "a", **common), train_dataset=rows,
                         zo_options={"eps": 1e-2, **zo_options})
    straight.train()

    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)   # tensors and plain values only
    assert saved["zo"]["step"] == 3 and saved["zo"]["seed"] == 3
    if zo_options.get("optimizer") == "zo-sgd-momentum":
        momentum = {k: v for k, v in saved["zo"]["groups"][0].items() if k.startswith("momentum.")}
        assert len(saved["param_groups"]) == 2 and momentum and all(v.abs().sum() > 0 for v in momentum.values())

    resumed = ZOTrainer(model=tiny_llama(seed=1), args=arguments(tmp_path / "b", **common), train_dataset=rows,
                        zo_options={"eps": 1e-2, **zo_options})
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.mezo.step_count == 6 and resumed.state.global_step == 6
    final = weights(resumed.model)
    for name, value in weights(straight.model).items():
        assert torch.equal(final[name], value), name
    init = weights(tiny_llama())
    assert any(not torch.equal(final[n], init[n]) for n in final)


def test_refuses_gradient_accumulation(tmp_path):
    with pytest.raises(ZoftError, match="gradient_accumulation_steps"):
        ZOTrainer(model=tiny_llama(), args=arguments(tmp_path, max_steps=1, gradient_accumulation_steps=2),
                  train_dataset=token_rows(8))


def test_declared_transformers_range_is_the_tested_one():
    """pyproject's `hf` extra declares TESTED_TRANSFORMERS, and this run's transformers lies in it."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["hf"] == [f"transformers{TESTED_TRANSFORMERS}"]
    assert transformers.__version__ in SpecifierSet(TESTED_TRANSFORMERS)

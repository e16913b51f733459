"""What a run leaves for Hugging Face tools: best/ opens with from_pretrained (full) or
PeftModel.from_pretrained (LoRA, prefix), and trainer_state.json carries HF's log_history."""
import json

import pytest
import torch

from zoft import api
from zoft.methods import load_run
from zoft.models import tiny_random_model

SMALL = {"task": "sst2", "n_train": 16, "n_dev": 8, "n_eval": 8, "max_length": 48, "progress": False, "steps": 4,
         "eval_every": 2, "eps": 1e-1}


@pytest.fixture
def base_folder(tmp_path):
    """The tiny Llama as an HF folder, so a run's base is something from_pretrained opens."""
    folder = tmp_path / "base"
    loaded = tiny_random_model("causal")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["a great movie", "it was terrible ."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method,lr", [("mezo", 5e-2), ("ft", 1e-2)])
def test_full_mode_best_is_a_folder_from_pretrained_loads(tmp_path, base_folder, method, lr):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = tmp_path / "run"
    api.train(method=method, model=str(base_folder), mode="full", lr=lr, output_dir=str(run), **SMALL)
    hf = AutoModelForCausalLM.from_pretrained(run / "best")
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    _, scorer = load_run(run)   # zoft's own path: best/trainable.safetensors
    trained = logits(scorer.model, tokenizer)
    assert torch.allclose(logits(hf, tokenizer), trained, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    assert not torch.allclose(logits(base, tokenizer), trained, atol=1e-3)   # best/ holds trained weights


@pytest.mark.parametrize("mode,lr", [("lora", 5e-2), ("prefix", 5e-1)])
def test_adapter_best_is_a_peft_folder_naming_its_base(tmp_path, base_folder, mode, lr):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run = tmp_path / "run"
    api.train(method="mezo", model=str(base_folder), mode=mode, lr=lr, output_dir=str(run), **SMALL)
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_folder.resolve())
    assert json.loads((run / "best" / "zoft_base_model.json").read_text())["name"] == str(base_folder)
    # as a user would: the base from the adapter's own config, then the adapter
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    untrained = logits(base, tokenizer)
    hf = PeftModel.from_pretrained(base, run / "best").eval()
    _, scorer = load_run(run)
    trained = logits(scorer.model, tokenizer)
    assert torch.allclose(logits(hf, tokenizer), trained, atol=1e-5)
    assert not torch.allclose(untrained, trained, atol=1e-4)


def test_a_builtin_name_without_a_folder_is_recorded_by_name(tmp_path):
    run = tmp_path / "run"
    api.train(method="mezo", model="tiny-llama", mode="lora", lr=5e-2, output_dir=str(run), **SMALL)
    assert json.loads((run / "best" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"


def test_trainer_state_carries_hfs_log_history_and_resume_still_works(tmp_path):
    run = tmp_path / "run"
    api.train(method="mezo", model="tiny-llama", lr=5e-2, output_dir=str(run), save_every=2, **SMALL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 4
    assert state["best_model_checkpoint"] == str(run / "best")
    assert state["best_metric"] == max(r["dev"] for r in records if "dev" in r)
    train = [e for e in state["log_history"] if "loss" in e]
    evals = [e for e in state["log_history"] if "eval_acc" in e]
    assert [(e["step"], e["loss"], e["learning_rate"]) for e in train] == [(r["step"], r["loss"], r["lr"])
                                                                          for r in records]
    assert [(e["step"], e["eval_acc"]) for e in evals] == [(r["step"], r["dev"]) for r in records if "dev" in r]
    # zoft reads its own checkpoints back with the HF fields in them
    result = api.train(resume=run, steps=6)
    assert result["steps"] == 6
    assert json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6

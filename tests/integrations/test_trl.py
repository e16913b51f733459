"""ZOTrainerMixin on TRL's SFTTrainer (trl is in the test extra; `make test` installs it)."""
from __future__ import annotations

import datasets
import pytest
import torch

from zoft.integrations.hf import ZOTrainerMixin
from zoft.models import tiny_random_model
from zoft.optim import MeZO

trl = pytest.importorskip("trl", reason="TRL is in the test extra: pip install -e '.[test]'")


class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer):
    pass


def test_sft_trainer_trains_with_mezo(tmp_path):
    """SFTTrainer's data pipeline and loss, MeZO's step: every weight moves, no .grad, the step
    count is Trainer's, and each training log has the loss and the projected gradient."""
    loaded = tiny_random_model("causal", seed=0)
    model = loaded.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = ["the movie was great", "a terrible film", "it was good fun", "bad and boring"] * 4
    args = trl.SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=2, max_length=16, report_to="none", use_cpu=True, disable_tqdm=True,
                         save_strategy="no")
    trainer = ZOSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                           processing_class=loaded.tokenizer, zo_options={"eps": 1e-2})
    trainer.train()

    assert isinstance(trainer.mezo, MeZO) and trainer.mezo.step_count == 4 == trainer.state.global_step
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert all(torch.isfinite(torch.tensor(entry["projected_grad"])) for entry in logs)

"""A classification head on the causal LM ("lm-cls"): bert-cls's recipe with the LM as the encoder.

The scoring study found a fine-tuned LLM ahead of a fine-tuned BERT; scoring label words with
the LM's vocabulary head (``ft``) did not get there on ASAP-SAS. This method does what bert-cls
does on MiniLM, on the LM that ``model=`` names (``smollm2-135m``, ``gemma3-270m``,
``tiny-llama``, any causal LM folder or GGUF): ``AutoModelForSequenceClassification`` for the
LM's architecture (``LlamaForSequenceClassification`` etc.), whose linear ``score`` head reads
the hidden state of the last non-pad token, with the LM's pretrained body copied in.

Input, per example, as in bert-cls (:func:`zoft.methods.encoder_classifier.input_texts`): the
response text alone for one-item scoring tasks; with several items the item's question comes
first, then a blank line, then the response (one segment: a causal LM has no segment ids, and
the last token, which the head reads, then follows the response); the rendered prompt for other
classification tasks.

Modes: ``full`` (every weight and the head) or ``lora`` (peft LoRA on the body, the head
trained whole: ``TaskType.SEQ_CLS`` puts ``score`` in ``modules_to_save``). Training is FT's
loop (:func:`zoft.methods.finetune.train`) with :class:`EncoderScorer`, under ``compute_dtype``
(bf16 autocast on a CPU with native bf16), so checkpoints, resume, best-dev weights and
``zoft eval``/``score``/``serve`` work as they do for bert-cls.
"""
from __future__ import annotations

import torch

from zoft.adapters import named_trainable
from zoft.errors import ZoftError
from zoft.methods.common import Setup, best_or_last_weights
from zoft.methods.encoder_classifier import EncoderScorer, freeze_bottom, freeze_embeddings, head_classes, input_texts, tokenize
from zoft.methods.finetune import train
from zoft.methods.linear_probe import require_classification
from zoft.methods.registry import Method, register_method
from zoft.training import Trainable

METHOD = "lm-cls"


def classifier_from_lm(lm, num_labels: int, seed: int = 0):
    """The sequence classifier of ``lm``'s architecture with ``lm``'s body weights and a fresh head.

    The head is initialised under ``seed`` (the global RNG is left as it was); the LM's output
    head (``lm_head``) is dropped.

    Raises:
        ZoftError: the architecture has no sequence-classification class in transformers, or
            the LM's weights do not fit it.
    """
    from transformers import AutoModelForSequenceClassification

    config = lm.config.__class__.from_dict(lm.config.to_dict())   # a copy: the LM's config stays as it was
    config.num_labels = num_labels
    config.problem_type = "single_label_classification"
    dtype = next(lm.parameters()).dtype
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    except ValueError as e:
        raise ZoftError(f"{METHOD}: transformers has no sequence classifier for model type "
                        f"'{config.model_type}': {str(e).splitlines()[0]}") from None
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    head = {name for name, _ in model.named_parameters() if name.startswith("score.")}
    if unexpected or set(missing) - head:
        raise ZoftError(f"{METHOD}: the LM's weights do not fit {type(model).__name__} (missing "
                        f"{sorted(set(missing) - head)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if config.pad_token_id is None:   # the head reads the last non-pad token, so padding must be known
        raise ZoftError(f"{METHOD}: the model config has no pad_token_id")
    return model.to(next(lm.parameters()).device).eval()


def with_mode(model, cfg):
    """``model`` with ``requires_grad`` on what ``cfg.mode`` trains: everything (less the input
    embeddings with ``cfg.freeze_embeddings``, less the bottom ``cfg.freeze_layers`` blocks), or LoRA
    plus the head."""
    if cfg.mode == "full":
        return freeze_bottom(freeze_embeddings(model.requires_grad_(True), cfg.freeze_embeddings), cfg.freeze_layers)
    from peft import LoraConfig, TaskType, get_peft_model

    with torch.random.fork_rng(devices=[]):   # the adapter init is a pure function of the seed
        torch.manual_seed(cfg.seed)
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                            target_modules=cfg.lora_targets, task_type=TaskType.SEQ_CLS)
        return get_peft_model(model, config)


class LMClassifierScorer(EncoderScorer):
    """:class:`EncoderScorer` over a causal LM's sequence classifier: one text segment, no segment ids."""

    def encode(self, examples):
        pairs = [(f"{second}\n\n{first}" if second else first, None)
                 for first, second in input_texts(self.task, examples)]
        return tokenize(self.tokenizer, pairs, [ex.target for ex in examples], self.max_length, token_types=False)


def _classifier(setup: Setup, n_classes: int) -> LMClassifierScorer:
    """The loaded LM turned into an ``n_classes``-way classifier in the config's mode, as a scorer."""
    cfg = setup.cfg
    lm = setup.loaded.model
    model = with_mode(classifier_from_lm(lm, n_classes, seed=cfg.seed), cfg)
    setup.loaded.model = model   # drop the LM (its body now lives in the classifier): memory
    limit = min(cfg.max_length, getattr(lm.config, "max_position_embeddings", cfg.max_length))
    return LMClassifierScorer(model, setup.loaded.tokenizer, setup.task, limit, compute_dtype=setup.compute_dtype)


def load_lm_cls_run(setup: Setup, run_dir) -> LMClassifierScorer:
    """The scorer of a finished lm-cls run: the LM's classifier with the best (else last) weights."""
    scorer = _classifier(setup, len(setup.task.label_words))
    Trainable(named_trainable(scorer.model)).load(run_dir.load_checkpoint(best_or_last_weights(run_dir))[0])
    scorer.model.eval()
    return scorer


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    """Fine-tune the LM with a classification head (full or LoRA) through FT's loop.

    Raises:
        ZoftError: not a classification task, a masked LM, or a label outside the head.
    """
    task, data = setup.task, setup.data
    require_classification(task, METHOD)
    if setup.loaded.is_masked_lm:
        raise ZoftError(f"{METHOD} puts a head on a causal LM; for an encoder use method=bert-cls encoder=FOLDER")
    n_classes = head_classes(task, data, METHOD)
    scorer = _classifier(setup, n_classes)
    return train(setup, run_dir, scorer.model, resume, scorer=scorer)


register_method(Method(METHOD, run, load=load_lm_cls_run, modes=("full", "lora"), trains=True))

__all__ = ["LMClassifierScorer", "classifier_from_lm", "load_lm_cls_run", "run", "with_mode"]

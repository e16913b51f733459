"""Run configuration: one flat, typed dataclass, loaded from YAML and ``key=value`` overrides.

Unknown keys and values of the wrong type are errors, as in nanoGPT's configurator, so a
typo never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoft.adapters import MODES
from zoft.errors import ZoftError
from zoft.lm import COMPUTE_DTYPES
from zoft.shared_prefix import SHARED_PREFIX_MODES
from zoft.tasks.decision import DECISIONS
from zoft.zo import BACKEND_NAMES, DISTRIBUTIONS, ESTIMATORS, OPTIMIZERS, SCHEDULES

class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans, which
    turned ``compile=off`` into False and then failed as "unknown compile 'False'"."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


OBJECTIVES = ("loss", "acc", "f1")   # what MeZO minimises: the LM loss, or minus a batch metric
REPORT_TO = ("none", "tensorboard")  # where training metrics go besides metrics.jsonl (HF's report_to)
AUTO = "auto"        # lr=auto: MeZO probes its step size (zoft.zo.auto_lr)
DEFAULT_LR = 1e-6    # the numeric default of the methods without lr=auto
HEAD_METHODS = ("lm-cls", "bert-cls")   # a fresh classification head on a pretrained body
BACKPROP_METHODS = ("ft", "lp-ft", *HEAD_METHODS)   # trained by AdamW in zoft.methods.finetune.train
ENSEMBLE = "ensemble"   # the method whose members are other runs (zoft.methods.ensemble)
ZO_METHODS = ("mezo", "lp-mezo")   # methods that train by ZO steps: lr=auto is theirs, and their default
# what an ensemble's members inherit and may not set: the same data for every member (none may
# train on another's dev or eval rows), one folder, and remote code only on the caller's word
ENSEMBLE_KEYS = ("task", "data_dir", "n_train", "n_dev", "n_eval", "k_per_class", "data_seed", "members",
                 "output_dir", "overwrite_output_dir", "trust_remote_code", "parallel")


@dataclass
class Config:
    """Everything a run needs. See configs/*.yaml for worked examples."""

    method: str = "mezo"
    model: str = "smollm2-135m"
    dtype: str = "fp32"
    compute_dtype: str = "auto"      # fp32 | bf16 | auto: bf16 matmuls over fp32 weights on a CPU with native bf16 (zoft.lm.resolve_compute_dtype), fp32 for ZO in LoRA mode (Setup.compute_dtype)
    device: str = "cpu"
    trust_remote_code: bool = False
    task: str = "sst2"
    data_dir: str | None = None
    # data sampling, as in the MeZO paper
    n_train: int = 1000
    n_dev: int = 500
    n_eval: int = 1000
    k_per_class: int | None = None
    data_seed: int = 0
    max_length: int = 256
    # training
    seed: int = 0
    mode: str = "full"
    steps: int = 1000
    batch_size: int = 16
    eval_batch_size: int = 32
    lr: float | str | None = None    # None: the method's default (MeZO "auto", see zoft.zo.auto_lr; others 1e-6)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    # backprop methods (BACKPROP_METHODS), under the names transformers' Trainer gives them
    group_by_length: bool = False    # batches of similar length (HF's length-grouped sampler): less padding
    adamw_fused: bool = False        # torch's fused AdamW kernel (HF optim=adamw_torch_fused): one pass, not a loop
    micro_batch_size: int | None = None   # run each batch, sorted by length, in pieces this big: less padding, same gradient
    eval_every: int = 100
    save_every: int | None = None
    load_best: bool = True
    decision: str = "argmax"         # argmax | expected: a scoring task's level nearest the expected score (zoft.tasks.decision)
    # MeZO
    eps: float = 1e-3
    n_directions: int = 1
    distribution: str = "auto"       # gaussian | rademacher | auto: rademacher on a CPU, gaussian on a GPU
    backend: str = "auto"
    objective: str = "loss"
    # ZO optimizer family and estimators (zoft.zo.OPTIMIZERS / ESTIMATORS; README "ZO optimizers")
    optimizer: str = "zo-sgd"
    estimator: str = "spsa"
    one_sided: bool = False
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lozo_rank: int = 2
    lozo_nu: int = 50
    smezo_fraction: float = 0.25     # estimator=smezo: the fraction of each tensor's weights perturbed (smallest |θ|)
    # small-model speed: trainable tensors as views of one buffer; compiled fixed-shape loss
    flat_params: bool = False
    compile: str = "off"
    shared_prefix: str = "auto"      # auto | on | off: run a rubric item's header once per batch (zoft.shared_prefix)
    # adapters (peft)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    num_virtual_tokens: int = 5
    # in-context learning and linear probing
    icl_k: int = 4
    lp_c: float = 1.0
    lp_ft_probe_steps: int = 0
    # lm-cls, bert-cls: keep the input embeddings as pretrained (Gemma-3-270M's are 168M of its 268M weights)
    freeze_embeddings: bool = False
    freeze_layers: int = 0           # lm-cls, bert-cls (full mode): the embeddings and the first N blocks stay as pretrained
    # bert-cls: the encoder fine-tuned with a classification head (a builtin name or a local HF folder)
    encoder: str = "minilm-l6"
    # ensemble: the member runs whose level probabilities it averages (zoft.methods.ensemble)
    members: list[Any] | None = None   # each a mapping of keys over this config's, or a finished run folder
    # scale (MeZO): trajectory checkpoints, torchrun data/direction parallelism, CPU offload
    trajectory: bool = True          # write trajectory.safetensors (seeds, g, lr per step: KBs) at each checkpoint
    save_weights: bool = True        # false: checkpoints are the trajectory only (resume replays it)
    parallel: str = "none"           # none | data (shard the batch) | direction (one seed per rank); under torchrun
    dist_timeout: float = 1800.0     # seconds a rank waits for the others before failing
    offload: bool = False            # stream decoder layers from (pinned) CPU memory to the GPU, ZO2-style
    offload_dual: bool = True        # offload: L+ and L− in one forward, so each layer streams once per step
    fused: bool = True               # plain MeZO in 2 weight passes per step (zo/fused.py) where it applies
    device_map: str | None = None    # auto | balanced: split the layers over several GPUs (accelerate)
    # output
    output_dir: str | None = None
    overwrite_output_dir: bool = False   # replace an earlier run in output_dir (else a fresh run there is refused)
    progress: bool = True
    threads: int | None = None       # torch CPU threads (torch.set_num_threads); empty: torch's own choice
    report_to: str = "none"          # none | tensorboard: train loss, lr and dev metric under RUN_DIR/tensorboard/
    # divergence guard (zoft.guard): roll back to the last good checkpoint and halve the lr
    guard: bool = True
    guard_factor: float = 1.5        # roll back when the loss EMA exceeds its best by this factor
    guard_max_rollbacks: int = 3     # then stop with one line

    def validate(self) -> "Config":
        # allowed values come from the registries that implement them (the method is checked by
        # zoft.methods.method_for, which also knows what each method supports)
        for key, allowed in (("mode", MODES), ("objective", OBJECTIVES),
                             ("dtype", ("fp32", "bf16", "fp16")), ("compute_dtype", COMPUTE_DTYPES),
                             ("lr_schedule", tuple(SCHEDULES)),
                             ("distribution", (*DISTRIBUTIONS, "auto")),
                             ("backend", BACKEND_NAMES),
                             ("parallel", ("none", "data", "direction")), ("report_to", REPORT_TO),
                             ("optimizer", tuple(OPTIMIZERS)), ("estimator", tuple(ESTIMATORS)),
                             ("compile", ("off", "default", "reduce-overhead", "cuda-graph")),
                             ("shared_prefix", SHARED_PREFIX_MODES), ("decision", DECISIONS)):
            if getattr(self, key) not in allowed:
                raise ZoftError(f"config: unknown {key} '{getattr(self, key)}'; choose from {', '.join(allowed)}")
        if self.distribution == "auto":   # resolved here, so config.yaml (and a resume) names the real one
            self.distribution = "rademacher" if self.device == "cpu" else "gaussian"
        for key in ("steps", "batch_size", "eval_batch_size", "eval_every", "n_directions", "max_length",
                    "n_dev", "n_eval", "lora_r", "num_virtual_tokens", "lozo_rank", "lozo_nu"):
            if getattr(self, key) < 1:
                raise ZoftError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        if self.n_train < 1 and self.n_train != -1:
            raise ZoftError(f"config: n_train must be >= 1, got {self.n_train} (or -1: every training row "
                            "dev does not take)")
        for key in ("save_every", "k_per_class", "threads", "micro_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ZoftError(f"config: {key} must be >= 1 (or empty for the default), got {getattr(self, key)}")
        for key in ("icl_k", "lp_ft_probe_steps", "warmup_steps", "freeze_layers"):
            if getattr(self, key) < 0:
                raise ZoftError(f"config: {key} must be >= 0, got {getattr(self, key)}")
        zo = self.method in ZO_METHODS
        if self.lr is None and self.method != ENSEMBLE:   # the method's default (an ensemble's members pick their own)
            self.lr = AUTO if zo else DEFAULT_LR
        if isinstance(self.lr, str) and (self.lr != AUTO or not zo):
            raise ZoftError(f"config: lr must be a number{' or auto' if zo else ''}, got '{self.lr}'")
        if not self.guard_factor > 1 or not math.isfinite(self.guard_factor):
            raise ZoftError(f"config: guard_factor must be a finite number > 1, got {self.guard_factor}")
        if self.guard_max_rollbacks < 0:
            raise ZoftError(f"config: guard_max_rollbacks must be >= 0, got {self.guard_max_rollbacks}")
        if not 0 < self.smezo_fraction <= 1:
            raise ZoftError(f"config: smezo_fraction must be in (0, 1], got {self.smezo_fraction}")
        # NaN passes every comparison, so each float is checked for finiteness before its range
        for key in ("lr", "eps", "lp_c", "dist_timeout")[int(self.lr in (AUTO, None)):]:
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ZoftError(f"config: {key} must be a finite number > 0, got {value}")
        for key in ("weight_decay", "momentum", "adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (key != "weight_decay" and value >= 1):
                bound = "finite and >= 0" if key == "weight_decay" else "in [0, 1)"
                raise ZoftError(f"config: {key} must be {bound}, got {value}")
        if self.estimator == "fzoo" and self.n_directions < 2:
            raise ZoftError("config: estimator=fzoo needs n_directions >= 2 (it normalises by the std of the losses)")
        if self.offload and self.weight_decay:
            raise ZoftError("config: offload=true needs weight_decay=0 (decay would scale the CPU copies "
                            "out of order with the passes queued for them)")
        if self.flat_params and self.estimator == "lozo":
            raise ZoftError("config: flat_params=true flattens matrices, which LOZO needs; use one or the other")
        if self.flat_params and self.weight_decay:
            raise ZoftError("config: flat_params=true cannot tell matrices from biases for weight decay; "
                            "set weight_decay=0")
        if (self.offload or self.device_map) and self.compile != "off":
            raise ZoftError("config: compile needs the weights at fixed addresses on one device; "
                            "offload and device_map move them: set compile=off")
        if self.offload and self.lr == AUTO:
            raise ZoftError("config: lr=auto probes the weights in place, which offload streams; set lr to a number")
        if self.offload and (self.flat_params or self.estimator != "spsa" or self.optimizer != "zo-sgd"):
            raise ZoftError("config: offload=true streams plain MeZO passes: use estimator=spsa, optimizer=zo-sgd, "
                            "flat_params=false")
        if self.freeze_embeddings and self.method not in (*HEAD_METHODS, ENSEMBLE):
            raise ZoftError(f"config: freeze_embeddings is for {' and '.join(HEAD_METHODS)} (a classification head "
                            f"on a pretrained body), not method={self.method}")
        if self.freeze_layers and (self.method not in (*HEAD_METHODS, ENSEMBLE) or self.mode != "full"):
            raise ZoftError(f"config: freeze_layers is for {' and '.join(HEAD_METHODS)} in mode=full, not "
                            f"method={self.method} mode={self.mode}")
        for key in ("group_by_length", "adamw_fused", "micro_batch_size"):
            if getattr(self, key) and self.method not in (*BACKPROP_METHODS, ENSEMBLE):
                raise ZoftError(f"config: {key} is for the backprop methods ({', '.join(BACKPROP_METHODS)}), "
                                f"not method={self.method}")
        if (self.method == ENSEMBLE) != (self.members is not None):
            raise ZoftError("config: method=ensemble needs members (a list), and members are for method=ensemble only")
        if self.members is not None:
            self.member_configs()   # every member's keys checked now, before any member trains
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ZoftError("config: report_to=tensorboard needs the tensorboard package: pip install tensorboard")
        return self

    def member_configs(self) -> list[tuple[str, "Config | Path"]]:
        """An ensemble's members, named ``I-METHOD`` (``I-FOLDER`` for a finished run), in order.

        A mapping member is this config with the member's keys over it: every member trains on
        the same data (the data keys are the ensemble's alone), and it cannot turn on
        ``trust_remote_code`` (that comes from the caller) or nest another ensemble. A string
        member is a finished run's folder, used as it is.
        """
        if not self.members:
            raise ZoftError("config: members is empty; an ensemble needs at least one member")
        base = {k: v for k, v in self.to_dict().items() if k not in ("method", "members", "output_dir")}
        out: list[tuple[str, Config | Path]] = []
        for i, member in enumerate(self.members):
            where = f"config: members[{i}]"
            if isinstance(member, str):
                out.append((f"{i}-{Path(member).name}", Path(member)))
                continue
            if not isinstance(member, dict):
                raise ZoftError(f"{where}: a member is a mapping of keys or a run folder, got {member!r}")
            if "method" not in member:
                raise ZoftError(f"{where}: names no method")
            fixed = sorted(set(member) & set(ENSEMBLE_KEYS))
            if fixed:
                raise ZoftError(f"{where}: '{fixed[0]}' is the ensemble's own, not a member's "
                                f"(members share its data, output_dir and trust_remote_code)")
            if member["method"] == ENSEMBLE:
                raise ZoftError(f"{where}: an ensemble cannot be a member of an ensemble")
            config = load_config(None, {**base, **member}, source=where)
            out.append((f"{i}-{config.method}", config))
        return out

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        task = Path(self.task).stem
        return Path("runs") / f"{task}-{self.method}-{self.mode}-{stamp}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One line per key for `zoft train --help`; tests/test_cli.py checks that every Config field has one.
KEY_HELP: dict[str, str] = {
    "method": "what to run: zero-shot, icl, lp, ft, lp-ft, mezo, lp-mezo, bert-cls, lm-cls, ensemble",
    "model": "builtin name (smollm2-135m, gemma3-270m, tiny-llama, tiny-bert), HF folder, .gguf file or hub id",
    "dtype": "weight dtype: fp32 | bf16 | fp16",
    "compute_dtype": "matmul dtype: fp32 | bf16 | auto (bf16 matmuls over fp32 weights on a CPU with native bf16, else the weights' dtype; "
                     "fp32 for ZO methods in LoRA mode, whose loss differences bf16 rounds away; config.yaml records the choice)",
    "device": "where the model runs, e.g. cpu or cuda",
    "trust_remote_code": "run the Python a model folder ships (never taken from a run's own config.yaml)",
    "task": "builtin task (sst2, rte, cb, boolq, copa, ...) or a task YAML in lm-eval-harness style",
    "data_dir": "folder of the builtin datasets (default: $ZOFT_DATA_DIR, else ../shared/data)",
    "n_train": "training examples sampled from the training split (-1: every row dev does not take)",
    "n_dev": "dev examples (model selection), sampled from the training split",
    "n_eval": "eval examples sampled from the validation split",
    "k_per_class": "sample k training examples per class instead of n_train",
    "data_seed": "seed of the data sampling",
    "max_length": "longest prompt in tokens (longer ones are cut from the left)",
    "seed": "seed of batches, directions, dropout and adapter init",
    "mode": "what trains: full | lora | prefix",
    "steps": "training steps",
    "batch_size": "training examples per step",
    "eval_batch_size": "examples per forward pass when evaluating",
    "lr": "learning rate (the peak, with warm-up or a schedule); auto (MeZO's default): probed on training batches (zoft.zo.auto_lr)",
    "lr_schedule": "constant | linear (decay to 0 at the last step)",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "weight decay",
    "group_by_length": "backprop methods: batches of similar length (transformers' length-grouped order)",
    "adamw_fused": "backprop methods: torch's fused AdamW kernel (faster; rounds differently from the loop)",
    "micro_batch_size": "backprop methods: run each batch, sorted by length, in pieces this big (less padding)",
    "eval_every": "evaluate on dev (and keep the best weights) every N steps",
    "save_every": "checkpoint every N steps (default: eval_every)",
    "load_best": "evaluate the best dev weights at the end (else the last ones)",
    "decision": "argmax | expected: report the most probable level, or (scoring tasks) the one nearest the mean",
    "eps": "MeZO perturbation scale",
    "n_directions": "random directions per MeZO step (n-SPSA)",
    "distribution": "direction distribution: gaussian | rademacher | auto (rademacher on a CPU, where z comes from random bits, else gaussian)",
    "backend": "perturbation backend: auto | torch | cpu-fast | triton | triton-fast",
    "objective": "what MeZO minimises: loss, or minus acc or f1 on the batch",
    "optimizer": "ZO optimizer: zo-sgd | zo-sgd-momentum | zo-sgd-sign | zo-sgd-cons | zo-adam",
    "estimator": "gradient estimator: spsa | fzoo | lozo",
    "one_sided": "SPSA with (L(θ+εz) − L(θ))/ε instead of the two-sided difference",
    "momentum": "momentum of zo-sgd-momentum",
    "adam_beta1": "zo-adam's first-moment decay",
    "adam_beta2": "zo-adam's second-moment decay",
    "lozo_rank": "rank of LOZO's low-rank directions",
    "lozo_nu": "steps between LOZO's resampling of V",
    "flat_params": "trainable tensors as views of one buffer (faster small-model steps)",
    "compile": "compiled fixed-shape loss: off | default | reduce-overhead | cuda-graph",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling alpha",
    "lora_targets": "LoRA target modules, comma-separated (default: peft's for the architecture)",
    "num_virtual_tokens": "prefix-tuning virtual tokens",
    "icl_k": "demonstrations per prompt for icl",
    "lp_c": "inverse L2 strength of the linear probe (scikit-learn C)",
    "lp_ft_probe_steps": "LP-FT: first steps that train the head only",
    "freeze_embeddings": "lm-cls, bert-cls: keep the input embeddings as pretrained (fewer weights to step)",
    "freeze_layers": "lm-cls, bert-cls (mode=full): keep the embeddings and the first N blocks as pretrained (shorter backward)",
    "encoder": "bert-cls encoder: builtin name (minilm-l6) or HF folder",
    "members": "ensemble: a list of members, each a mapping of keys over this config's (e.g. {method: bert-cls}) or a finished run folder",
    "trajectory": "write trajectory.safetensors (seeds, g, lr per step) at each checkpoint",
    "save_weights": "false: checkpoints are the trajectory only (resume replays it)",
    "parallel": "under torchrun: none | data (shard the batch) | direction (one seed per rank)",
    "dist_timeout": "seconds a rank waits for the others before failing",
    "offload": "stream decoder layers from CPU memory to the GPU (ZO2-style)",
    "offload_dual": "offload: L+ and L− in one forward, so each layer streams once per step",
    "fused": "plain MeZO in 2 weight passes per step where it applies",
    "device_map": "auto | balanced: split the layers over several GPUs (accelerate)",
    "output_dir": "run directory (default: runs/TASK-METHOD-MODE-TIME)",
    "overwrite_output_dir": "replace an earlier run in output_dir",
    "progress": "progress bars; false: one line per evaluation instead",
    "threads": "CPU threads for torch (default: torch's own choice)",
    "report_to": "none | tensorboard: log loss, lr and dev metric under RUN_DIR/tensorboard/",
    "shared_prefix": "auto | on | off: run a rubric item's shared header once per batch and reuse its keys and values",
    "guard": "divergence guard: on a loss climb or blown-up weights, roll back to the last good state and halve the lr",
    "guard_factor": "the guard fires when the 10-step loss average exceeds its best 100-step average by this factor",
    "guard_max_rollbacks": "rollbacks before the run stops with one line",
    "smezo_fraction": "estimator=smezo: the fraction of each tensor's weights perturbed (those smallest in |θ|)",
}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Cast an override to the type of the field, or fail naming the key."""
    f = {f.name: f for f in dataclasses.fields(Config)}[key]
    type_text = str(f.type)
    if value is None:
        if "None" in type_text:
            return None
        raise ZoftError(f"{source}: '{key}' cannot be empty")
    try:
        if type_text.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if type_text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_text.startswith("float"):
            if "str" in type_text and isinstance(value, str) and value.strip().lower() == AUTO:
                return AUTO
            return float(value)
        if key == "members":   # mappings and run folders, checked by Config.member_configs
            if not isinstance(value, list):
                raise ValueError
            return list(value)
        if type_text.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
        return str(value)
    except (TypeError, ValueError):
        expected = ("a number or auto" if type_text.startswith("float | str") else
                    "a list of mappings or run folders" if key == "members" else type_text)
        raise ZoftError(f"{source}: '{key}' expects {expected}, got {value!r}") from None


def _did_you_mean(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-6", "mode=lora"]`` → ``{"lr": 1e-6, "mode": "lora"}`` (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ZoftError(f"argument '{item}' is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml_load(value) if value else None
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                source: str | None = None) -> Config:
    """Config from an optional YAML file, then ``key=value`` overrides (torchtune style).

    ``source`` names where the overrides come from in error messages (default: "override").
    """
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Config)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ZoftError(f"{path}: config file not found")
        try:
            loaded = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ZoftError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ZoftError(f"{path}: a config is a mapping of key: value")
        for key, value in loaded.items():
            if key not in known:
                raise ZoftError(f"{path}: unknown config key '{key}'{_did_you_mean(key, known)}")
            values[key] = _coerce(key, value, str(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        if key not in known:
            where = f"{source}: unknown key" if source else "unknown option"
            raise ZoftError(f"{where} '{key}'{_did_you_mean(key, known)}")
        values[key] = _coerce(key, value, source or "override")
    return Config(**values).validate()

"""Run configuration: one flat, typed dataclass, loaded from YAML and ``key=value`` overrides.

Unknown keys and values of the wrong type are errors, as in nanoGPT's configurator, so a
typo never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoft.adapters import MODES
from zoft.errors import ZoftError
from zoft.lm import COMPUTE_DTYPES
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


@dataclass
class Config:
    """Everything a run needs. See configs/*.yaml for worked examples."""

    method: str = "mezo"
    model: str = "smollm2-135m"
    dtype: str = "fp32"
    compute_dtype: str = "fp32"      # fp32 | bf16 | auto: matmuls in bf16 over fp32 weights (zoft.lm.resolve_compute_dtype)
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
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int | None = None
    load_best: bool = True
    # MeZO
    eps: float = 1e-3
    n_directions: int = 1
    distribution: str = "gaussian"
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
    # small-model speed: trainable tensors as views of one buffer; compiled fixed-shape loss
    flat_params: bool = False
    compile: str = "off"
    # adapters (peft)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    num_virtual_tokens: int = 5
    # in-context learning and linear probing
    icl_k: int = 4
    lp_c: float = 1.0
    lp_ft_probe_steps: int = 0
    # bert-cls: the encoder fine-tuned with a classification head (a builtin name or a local HF folder)
    encoder: str = "minilm-l6"
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

    def validate(self) -> "Config":
        # allowed values come from the registries that implement them (the method is checked by
        # zoft.methods.method_for, which also knows what each method supports)
        for key, allowed in (("mode", MODES), ("objective", OBJECTIVES),
                             ("dtype", ("fp32", "bf16", "fp16")), ("compute_dtype", COMPUTE_DTYPES),
                             ("lr_schedule", tuple(SCHEDULES)),
                             ("distribution", DISTRIBUTIONS),
                             ("backend", BACKEND_NAMES),
                             ("parallel", ("none", "data", "direction")),
                             ("optimizer", tuple(OPTIMIZERS)), ("estimator", tuple(ESTIMATORS)),
                             ("compile", ("off", "default", "reduce-overhead", "cuda-graph"))):
            if getattr(self, key) not in allowed:
                raise ZoftError(f"config: unknown {key} '{getattr(self, key)}'; choose from {', '.join(allowed)}")
        for key in ("steps", "batch_size", "eval_batch_size", "eval_every", "n_directions", "max_length",
                    "n_dev", "n_eval", "lora_r", "num_virtual_tokens", "lozo_rank", "lozo_nu"):
            if getattr(self, key) < 1:
                raise ZoftError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        if self.n_train < 1 and self.n_train != -1:
            raise ZoftError(f"config: n_train must be >= 1, got {self.n_train} (or -1: every training row "
                            "dev does not take)")
        for key in ("save_every", "k_per_class"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ZoftError(f"config: {key} must be >= 1 (or empty for the default), got {getattr(self, key)}")
        for key in ("icl_k", "lp_ft_probe_steps", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ZoftError(f"config: {key} must be >= 0, got {getattr(self, key)}")
        # NaN passes every comparison, so each float is checked for finiteness before its range
        for key in ("lr", "eps", "lp_c", "dist_timeout"):
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
        if self.offload and (self.flat_params or self.estimator != "spsa" or self.optimizer != "zo-sgd"):
            raise ZoftError("config: offload=true streams plain MeZO passes: use estimator=spsa, optimizer=zo-sgd, "
                            "flat_params=false")
        return self

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        task = Path(self.task).stem
        return Path("runs") / f"{task}-{self.method}-{self.mode}-{stamp}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            return float(value)
        if type_text.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
        return str(value)
    except (TypeError, ValueError):
        raise ZoftError(f"{source}: '{key}' expects {type_text}, got {value!r}") from None


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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Config from an optional YAML file, then ``key=value`` overrides (torchtune style)."""
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
            raise ZoftError(f"unknown option '{key}'{_did_you_mean(key, known)}")
        values[key] = _coerce(key, value, "override")
    return Config(**values).validate()

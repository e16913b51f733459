"""``zoft replay BASE TRAJECTORY``: rebuild a MeZO run's weights from its base model and trajectory.

The format, the recorder (written at each checkpoint, read by ``--resume``) and the replay loop
are in :mod:`zoft.zo.trajectory`; the stepper is built by :mod:`zoft.zo.build`, as training built it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from zoft.atomic import atomic_dir
from zoft.errors import ZoftError
from zoft.zo.build import build_components, build_stepper, trained_params
from zoft.zo.trajectory import (WRAPPER_NAMES, Trajectory, TrajectoryMismatch, check_base, check_mask_rule, init_sha,
                                replay_through)

log = logging.getLogger(__name__)


def rebuild(base: str, trajectory_path: str | Path, output: str | Path, device: str | None = None,
            progress: bool = True, trust_remote_code: bool = False) -> Path:
    """``zoft replay``: the fine-tuned weights of a MeZO run from its base model and trajectory.

    Writes ``output/trainable.safetensors`` (the trained tensors by name, as in a checkpoint)
    and the model in Hugging Face format (full: ``save_pretrained`` + tokenizer; LoRA/prefix: the
    peft adapter), atomically. ``trust_remote_code`` is the caller's alone: the trajectory's
    recorded config cannot turn it on.
    """
    from zoft.adapters import named_trainable
    from zoft.config import load_config
    from zoft.methods.common import Setup
    from zoft.models import load_model

    traj = Trajectory.load(trajectory_path)
    header = traj.header
    backend = header["config"].get("backend", "auto") if header["backend"] in WRAPPER_NAMES else header["backend"]
    overrides = {"backend": backend, "parallel": "none", "trust_remote_code": trust_remote_code} \
        | ({"device": device} if device else {})
    if header["config"].get("method", "mezo") != "mezo":   # lp-mezo starts from its probe head, not the base
        raise TrajectoryMismatch(f"{trajectory_path}: a {header['config']['method']} run starts from weights the base "
                                 "model alone does not give; load its run directory instead (zoft eval --model RUN_DIR)")
    check_mask_rule(header, where=str(trajectory_path))
    cfg = load_config(overrides={**header["config"], **overrides})
    loaded = load_model(base, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    model = Setup(cfg, None, None, loaded).with_mode()
    named = named_trainable(model)
    check_base(header, loaded.identity, init_sha(cfg.mode, named), where=str(trajectory_path))
    if torch.device(cfg.device).type != header["device_type"]:
        log.warning("replaying a %s trajectory on %s: close to the trained weights, not bit-identical",
                    header["device_type"], cfg.device)
    estimator, optimizer = build_components(cfg, cfg.device)
    # the header says how the run stepped (a data-parallel run, say, did not fuse)
    stepper = build_stepper(cfg, trained_params(cfg, named), estimator, optimizer, fuse=bool(header.get("fused")))
    if header.get("fused") and not stepper.fused:
        raise ZoftError(f"{trajectory_path}: recorded with the fused 2-pass step, which backend "
                        f"'{estimator.backend.name}' cannot replay")
    with tqdm(total=traj.steps, desc="replay", disable=not progress) as bar:
        replay_through(stepper, traj, progress=lambda t: bar.update(1))

    output = Path(output)
    with atomic_dir(output) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(tmp / "trainable.safetensors"),
                  metadata={"steps": str(traj.steps), "base": header["base"]["identity"]})
        model.save_pretrained(str(tmp), safe_serialization=True)
        if cfg.mode == "full" and loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
    return output

"""Methods: thin recipes over the shared components, one module each.

Every method is ``run(setup, run_dir, resume=False) -> result dict`` and writes
``eval.json`` into its run directory.
"""
from __future__ import annotations

import importlib

from zoft.errors import ZoftError

# method name -> (module, function)
METHODS = {
    "zero-shot": ("zoft.methods.zero_shot", "run"),
    "icl": ("zoft.methods.icl", "run"),
    "lp": ("zoft.methods.linear_probe", "run"),
    "ft": ("zoft.methods.finetune", "run"),
    "lp-ft": ("zoft.methods.finetune", "run_lp_ft"),
    "mezo": ("zoft.methods.mezo", "run"),
    "bert-cls": ("zoft.methods.encoder_classifier", "run"),
}


def get_method(name: str):
    if name not in METHODS:
        raise ZoftError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    module, fn = METHODS[name]
    return getattr(importlib.import_module(module), fn)

"""Methods: thin recipes over the shared components, one module each, registered by name.

Every method is ``run(setup, run_dir, resume=False) -> result dict`` and writes ``eval.json``
into its run directory; :mod:`zoft.methods.registry` says what each supports and how a
finished run of it is loaded back.
"""
# importing a method module registers it; this order is the order users see them listed in
from zoft.methods import zero_shot, icl, linear_probe, finetune, mezo, encoder_classifier, lm_classifier, ensemble  # noqa: F401, I001
from zoft.methods.registry import METHODS, Method, get_method, load_run, method_for, register_method

__all__ = ["METHODS", "Method", "get_method", "load_run", "method_for", "register_method"]

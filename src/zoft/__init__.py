"""zoft: fine-tune language models with forward passes only (MeZO), with honest baselines.

Public API::

    import zoft
    zoft.train(method="mezo", task="sst2", model="smollm2-135m", steps=500, lr=1e-6)
    zoft.evaluate("runs/my-run")
"""
from zoft.errors import DataError, ZoftError

__all__ = ["train", "evaluate", "Config", "load_config", "ZoftError", "DataError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: `import zoft.zo` should not pay for transformers and peft.
    if name in ("train", "evaluate"):
        from zoft import api
        return getattr(api, name)
    if name in ("Config", "load_config"):
        from zoft import config
        return getattr(config, name)
    raise AttributeError(name)

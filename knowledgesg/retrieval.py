"""Retrieval over a public example pool: sentence embeddings (MiniLM) and a faiss index.

The index is cached by content (the pool's text and the embedder's weights), so each pool is
embedded once per machine, whatever run or client asks for it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knowledgesg.fileio import canonical_json, sha256_text, write_json


def load_embedder(path: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def embed(embedder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings, so inner product is cosine similarity."""
    vectors = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass
class ExampleIndex:
    index: object  # faiss.IndexFlatIP
    directory: Path
    built: bool  # False when it came from the cache

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)  # type: ignore[attr-defined]


def build_or_load_index(pool_texts: list[str], embedder, embedder_sha: str, cache_dir: Path) -> ExampleIndex:
    """Exact inner-product search (IndexFlatIP): pools here are thousands, not millions."""
    import faiss

    key = sha256_text(canonical_json({"texts": pool_texts, "embedder": embedder_sha}))[:32]
    directory = cache_dir / "indexes" / key
    if (directory / "index.faiss").is_file():
        return ExampleIndex(faiss.read_index(str(directory / "index.faiss")), directory, built=False)
    vectors = embed(embedder, pool_texts)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=directory.parent))
    faiss.write_index(index, str(tmp / "index.faiss"))
    write_json(tmp / "meta.json", {"size": len(pool_texts), "dim": int(vectors.shape[1]), "embedder_sha256": embedder_sha})
    try:
        tmp.rename(directory)
    except OSError:  # another process cached the same pool meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return ExampleIndex(index, directory, built=True)


def index_meta(index: ExampleIndex) -> dict:
    return json.loads((index.directory / "meta.json").read_text())

"""Stage `structure` (runs on each client, before dp_train): unstructured text to pairs.

The FedIT-U2S idea: each client's long texts (abstracts, transcripts) are cut into token-aware
chunks; for each chunk the k most similar examples of a *public* example pool are retrieved
(MiniLM embeddings, faiss) and shown as few-shot examples; the base model writes one question and
its answer grounded in the chunk. A pair is kept only if it parses, its answer is grounded in the
chunk (share of its content words found there), and it is not a duplicate.

With a labelled pool (e.g. FiQA sentiment), the chunk's most informative sentence becomes the
input (grounded by construction) and the model labels it, prompted with the retrieved examples:
a 135M model cannot both copy a sentence and label it in one generation (measured on the
earnings-call transcripts).

Its output is private: it stays on the client and feeds dp_train (`source_stage: structure`),
together with the client's own instruction records, which pass through unchanged. Every pair
carries the id of the text it came from as `document_id` (and that text's `user_id`): the pairs
of one transcript are one privacy unit in dp_train, the "source document".

So each document's pairs are a function of that document alone (and the public pool and spec):
its chunks are capped per document, its examples, embeddings and generations are drawn in calls of
its own with a seed of its own content, and near-duplicates are removed within it. A document
added to a client's data then adds its own pairs and changes no other document's, so DP-SGD's
neighbours (one unit apart) are still one unit apart after this stage.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from knowledgesg.chunking import chunk_text
from knowledgesg.console import console
from knowledgesg.dedup import near_duplicates
from knowledgesg.errors import InputError, SpecError
from knowledgesg.fileio import read_jsonl, sha256_text
from knowledgesg.generation import Completion, Generator, SamplingParams, chat_prompt_ids
from knowledgesg.loaders import load_example_pool, refuse_client_data, source_path
from knowledgesg.models import Precision, ResolvedModel, cache_root, load_causal_lm, resolve_device, resolve_precision
from knowledgesg.prompts import parse_label, user_message
from knowledgesg.records import InstructionRecord, TextRecord
from knowledgesg.retrieval import build_or_load_index, embed, index_meta, load_embedder
from knowledgesg.spec import DataSource, PipelineSpec, StrictModel
from knowledgesg.stage import Stage, StageContext

STOPWORDS = frozenset("the a an and or of to in on for with by at from as is are was were be been this that these those it its their there which who what when how why not no".split())
NEAR_DUPLICATE_JACCARD = 0.7
INSTRUCTION = "Write one question that this text answers, and answer it with a sentence copied from the text."


class StructureParams(StrictModel):
    pool: DataSource = Field(description="the public example pool (instruction records), e.g. {builtin: medquad}")
    k: int = Field(default=3, ge=1, le=10)
    selection: Literal["retrieved", "random"] = Field(default="retrieved", description="'random' is the ablation baseline")
    chunk_tokens: int = Field(default=192, ge=16)
    overlap_tokens: int = Field(default=32, ge=0)
    max_chunks_per_document: int | None = Field(default=None, ge=1, description="the first chunks of each text, at most this many")
    max_chunks_per_client: int | None = Field(default=None, ge=1, description="refused: use max_chunks_per_document")
    example_words: int = Field(default=25, ge=5, description="a pool example's answer is cut to this many words in the prompt")
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(do_sample=False, max_new_tokens=128))
    batch_size: int = Field(default=8, ge=1)
    min_grounding: float = Field(default=0.5, ge=0, le=1)
    labels: list[str] | None = Field(default=None, description="a labelled pool: the answer must be one of these, and the question is what must be grounded")
    precision: Precision = Field(default="float32", description="the base model's weights while it writes pairs (auto: bfloat16 where native)")

    @model_validator(mode="after")
    def _no_cap_across_documents(self) -> "StructureParams":
        if self.max_chunks_per_client is not None:
            raise ValueError("max_chunks_per_client: a cap over a client's documents lets one document push another's chunks out "
                             "(DP-SGD's neighbours would differ in two documents); use max_chunks_per_document")
        return self


@dataclass
class DocumentPairs:
    """What one document gave: its kept pairs, why the rest were rejected, and the grounding
    scores of the kept pairs (unlabelled pool)."""

    chunks: int = 0
    pairs: list[dict] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in STOPWORDS]


def grounding(answer: str, chunk: str) -> float:
    """Share of the answer's content words that occur in the chunk (0 for an empty answer)."""
    words = content_words(answer)
    if not words:
        return 0.0
    present = set(content_words(chunk))
    return sum(w in present for w in words) / len(words)


def parse_pair(completion: str, min_answer_words: int = 2) -> tuple[str, str] | None:
    """'<question>\\nAnswer: <answer>' (the prompt ends with 'Question:'), or None."""
    match = re.match(r"\s*(.+?)\s*\n?\s*Answer\s*:\s*(.+)", completion, flags=re.DOTALL | re.IGNORECASE)
    if not match:
        return None
    question = match.group(1).strip()
    # the answer ends where the model starts another question, example or text
    answer = re.split(r"(?:^|\n)\s*(?:Question|Example|Text)\s*\d*\s*:", match.group(2))[0].strip()
    if len(question.split()) < 3 or len(answer.split()) < min_answer_words:
        return None
    return question, answer


def few_shot_prompt(examples: list[InstructionRecord], chunk: str, example_words: int) -> str:
    """Examples first, then the text, then the request. With the request last, a small model
    asks about the text rather than imitating the examples' topics (measured: see
    benchmarks/results/structure_ablation.md)."""
    shots = "\n\n".join(f"Question: {user_message(e)}\nAnswer: {' '.join(e.response.split()[:example_words])}" for e in examples)
    return f"Examples of questions and answers:\n\n{shots}\n\nText: {chunk}\n\n{INSTRUCTION}"


def key_sentence(text: str, min_words: int = 6, max_words: int = 60) -> str | None:
    """The sentence of a chunk with the most content words (None if none has a usable length)."""
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text) if min_words <= len(x.split()) <= max_words]
    return max(sentences, key=lambda x: (len(set(content_words(x))), -len(x)), default=None)


def labelled_prompt(examples: list[InstructionRecord], instruction: str, sentence: str) -> str:
    shots = "\n\n".join(f"Question: {user_message(e)}\nAnswer: {e.response}" for e in examples)
    return f"{shots}\n\nQuestion: {instruction}\n{sentence}"


class Structure(Stage):
    name = "structure"
    Params = StructureParams

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models", "ingest")

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(self.params.pool, base_dir, f"{self.name} params.pool")]  # editing the pool reruns the stage

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        if spec.models.embedder is None:
            raise SpecError("models.embedder: missing, and stage 'structure' needs it (e.g. minilm-l6-v2)")
        # the pool is public by contract: its prompts stay on the client, but pool_index.json (a digest
        # of the pool's texts) goes to the server, where it would confirm a guessed private record
        refuse_client_data(self.params.pool, spec.clients.sources(), base_dir, "structure params.pool")
        load_example_pool(self.params.pool, base_dir, spec.seed, "structure params.pool", minimum=self.params.k)

    def run(self, ctx: StageContext) -> None:
        p: StructureParams = self.params
        models = ctx.models()  # with an embedder: preflight refused a spec without
        pool = load_example_pool(p.pool, ctx.base_dir, ctx.seed, "structure params.pool", minimum=p.k)
        device = resolve_device(ctx.spec.models.device)
        embedder = load_embedder(models["embedder"]["path"], device)
        index = build_or_load_index([user_message(r) for r in pool], embedder, models["embedder"]["weights_sha256"], cache_root(ctx.spec.models.cache_dir))
        console.print(f"structure: example pool of {len(pool)} ({'built' if index.built else 'reused'} index {index.directory.name})")
        ctx.write_json("pool_index.json", {**index_meta(index), "cache_key": index.directory.name})
        dtype = resolve_precision(p.precision, device)
        model, tokenizer = load_causal_lm(ResolvedModel(**models["base"]), device, dtype)
        generator = Generator(model, tokenizer, p.batch_size, device)
        partition = ctx.read_artifact_json("ingest", "partition.json")
        for client_id in partition["clients"]:
            rows = read_jsonl(ctx.artifact("ingest", f"clients/{client_id}/records.jsonl"))
            texts = [TextRecord.model_validate(r) for r in rows if r["kind"] == "text"]
            own = [r for r in rows if r["kind"] == "instruction"]
            if not texts:
                raise InputError(f"structure: client '{client_id}' has no text records to structure (give its corpus kind: text)")
            documents = [self.structure_document(ctx, client_id, text, pool, index, embedder, tokenizer, generator) for text in texts]
            pairs = [pair for document in documents for pair in document.pairs]
            stats = client_stats(documents, pairs, labelled=bool(p.labels))
            side = f"client:{client_id}"
            # how many pairs a document gives is a function of its content (its length, what the model
            # wrote of it), not of N even where N is public: no count in the manifest or on the
            # console (a log the server may hold), only in the client's own stats
            ctx.write_jsonl(f"clients/{client_id}/records.jsonl", own + pairs, side=side, records=False)
            ctx.write_json(f"clients/{client_id}/structure_stats.json", {**stats, "precision": dtype}, side=side)
            console.print(f"structure {client_id}: done (its counts in clients/{client_id}/structure_stats.json, on its side)")

    def structure_document(self, ctx: StageContext, client_id: str, text: TextRecord, pool: list[InstructionRecord], index, embedder, tokenizer,
                           generator: Generator) -> DocumentPairs:
        """One document's pairs, from it alone: its own chunks, examples, embedding and generation
        calls (batching across documents would let one change another's floats), and a seed of its
        own content (a client-wide seed's draws would shift with every document before it)."""
        p: StructureParams = self.params
        chunks = chunk_text(tokenizer, text.id, text.text, p.chunk_tokens, p.overlap_tokens)[: p.max_chunks_per_document]
        if not chunks:
            return DocumentPairs()
        own_seed = sha256_text(f"{text.text}\0{text.user_id or ''}")  # not its id: without an id column that is its line, which a document inserted before it moves
        if p.selection == "retrieved":
            _, neighbours = index.search(embed(embedder, [c.text for c in chunks]), p.k)
        else:
            rng = random.Random(ctx.derive_seed(client_id, "random-examples", own_seed))
            neighbours = [rng.sample(range(len(pool)), p.k) for _ in chunks]
        seed = ctx.derive_seed(client_id, "structure", own_seed)
        if p.labels:
            sentences = [key_sentence(c.text) for c in chunks]
            instructions = [pool[row[0]].instruction for row in neighbours]  # the nearest example's public task line
            prompts = [chat_prompt_ids(tokenizer, labelled_prompt([pool[j] for j in row], instruction, sentence or ""), "Answer:")
                       for row, instruction, sentence in zip(neighbours, instructions, sentences)]
            completions = generator.generate(prompts, p.sampling.model_copy(update={"max_new_tokens": 8}), seed, f"structure {client_id}")
            return self.keep_labelled(client_id, chunks, sentences, instructions, completions, p.labels, text.user_id)
        prompts = [chat_prompt_ids(tokenizer, few_shot_prompt([pool[j] for j in row], c.text, p.example_words), "Question:") for c, row in zip(chunks, neighbours)]
        completions = generator.generate(prompts, p.sampling, seed, f"structure {client_id}")
        return self.keep(client_id, chunks, completions, p.min_grounding, text.user_id)

    @staticmethod
    def keep_labelled(client_id: str, chunks, sentences, instructions, completions: list[Completion], labels: list[str], user_id: str | None) -> DocumentPairs:
        """One document's labelled pairs: a usable key sentence with a parsed label, near-duplicate sentences dropped."""
        rejected: Counter = Counter()
        candidates = []
        for chunk, sentence, instruction, completion in zip(chunks, sentences, instructions, completions):
            label = parse_label(completion.text, labels) if sentence else None
            if sentence is None:
                rejected["no usable sentence"] += 1
            elif label is None:
                rejected["no label"] += 1
            else:
                candidates.append((chunk, instruction, sentence, label))
        duplicates = near_duplicates([sentence for _, _, sentence, _ in candidates], NEAR_DUPLICATE_JACCARD, seed=1)
        rejected["duplicate"] += len(duplicates)
        pairs = [
            InstructionRecord(id=f"structured/{client_id}/{chunk.record_id}/{chunk.index}", instruction=instruction, input=sentence, response=label,
                              client_id=client_id, source=f"structured:{chunk.record_id.split('/')[0]}",
                              document_id=chunk.record_id, user_id=user_id).model_dump()
            for number, (chunk, instruction, sentence, label) in enumerate(candidates) if number not in duplicates
        ]
        return DocumentPairs(len(chunks), pairs, rejected)

    @staticmethod
    def keep(client_id: str, chunks, completions: list[Completion], min_grounding: float, user_id: str | None) -> DocumentPairs:
        """One document's pairs: parsed, grounded in their chunk, near-duplicate questions dropped."""
        rejected: Counter = Counter()
        candidates = []
        for chunk, completion in zip(chunks, completions):
            parsed = parse_pair(completion.text)
            if parsed is None:
                rejected["unparseable"] += 1
                continue
            score = grounding(parsed[1], chunk.text)
            if score < min_grounding:
                rejected["not grounded"] += 1
                continue
            candidates.append((chunk, *parsed, score))
        duplicates = near_duplicates([question for _, question, _, _ in candidates], NEAR_DUPLICATE_JACCARD, seed=1)
        rejected["duplicate"] += len(duplicates)
        document = DocumentPairs(len(chunks), rejected=rejected)
        for number, (chunk, question, answer, score) in enumerate(candidates):
            if number in duplicates:
                continue
            document.scores.append(score)
            instruction, _, input_text = question.partition("\n")
            document.pairs.append(InstructionRecord(id=f"structured/{client_id}/{chunk.record_id}/{chunk.index}", instruction=instruction.strip(),
                                                    input=input_text.strip(), response=answer, client_id=client_id,
                                                    source=f"structured:{chunk.record_id.split('/')[0]}", document_id=chunk.record_id,
                                                    user_id=user_id).model_dump())
        return document


def client_stats(documents: list[DocumentPairs], pairs: list[dict], labelled: bool) -> dict:
    """A client's structure_stats.json (on its side): chunks, kept, why the rest were rejected,
    and the label mix (labelled pool) or the mean grounding of what was kept."""
    rejected: Counter = Counter()
    for document in documents:
        rejected.update(document.rejected)  # not `+`: that drops a reason counted 0 ("duplicate": 0), which the stats always showed
    stats = {"chunks": sum(d.chunks for d in documents), "kept": len(pairs), "rejected": dict(rejected)}
    if labelled:
        return {**stats, "labels": dict(Counter(p["response"] for p in pairs))}
    scores = [score for d in documents for score in d.scores]
    return {**stats, "mean_grounding": round(sum(scores) / len(scores), 4) if scores else None}

"""The headline comparison, medicine: does the pipeline beat the obvious private alternatives?

Usage:  .venv/bin/python benchmarks/medicine_comparison.py [--medquad 60] [--dialogues 60] [--abstracts 12] [--limit 100] [--workdir DIR]

Private data over 2 hospitals (IID): `--medquad` MedQuAD question-answer pairs, `--dialogues`
GenMedGPT-5k patient-doctor dialogues, and `--abstracts` PubMed abstracts (outside PubMedQA's
test set) that `structure` turns into question-answer pairs. MedQuAD is split, seeded, before
anything runs: the private part is written to the work directory and only the rest is the
public pool that `structure` and `refine` draw few-shot examples from, so no private record
can reach a prompt. 32 canaries are planted in hospital_a (each with probability 1/2, 4
copies) and 10 records per hospital are held out for membership inference.

The runs and rows are those of benchmarks/_comparison.py. Columns: PubMedQA (with its
abstract) and MedQA accuracy by log-probability of the answer letter or word on `--limit`
seeded test items; fidelity of the synthetic data the row's model was tuned on (Fréchet
distance on MiniLM embeddings to the client's private data, mean over the hospitals, beside the
private-against-private floor); canary exposure; PII replays beyond the base model; epsilon.
Writes benchmarks/results/medicine_comparison.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, write_result  # noqa: E402
from _comparison import AUDITED_MODELS, Row, add_run_arguments, audit_argv, count_lines, per_client_table, run_three, table  # noqa: E402

TASKS = ["pubmedqa", "medqa"]
CLIENTS = ["hospital_a", "hospital_b"]
SEEDS = [
    {"prefix": "Doctor, I have", "domain": "medicine", "task": "consultation"},
    {"prefix": "What are the symptoms of", "domain": "medicine", "task": "question"},
    {"prefix": "How is", "domain": "medicine", "task": "question"},
    {"prefix": "What causes", "domain": "medicine", "task": "question"},
]


def split_medquad(workdir: Path, private_count: int, seed: int) -> tuple[Path, Path]:
    """MedQuAD, shuffled with the seed: the first `private_count` pairs private, the rest public."""
    from knowledgesg.builtin_data import load_builtin

    records = load_builtin("medquad", "medquad")
    random.Random(seed).shuffle(records)
    paths = workdir / "medquad_private.jsonl", workdir / "medquad_public.jsonl"
    for path, part in zip(paths, (records[:private_count], records[private_count:])):
        path.write_text("".join(json.dumps({"instruction": r.instruction, "response": r.response}) + "\n" for r in part))
    return paths


def base_spec(args, private: Path, public: Path, name: str, epsilon: float) -> dict:
    return {
        "name": f"medicine-{name}", "seed": args.seed,
        "models": {"base": "smollm2-135m-instruct", "professional": "gemma-3-270m", "embedder": "minilm-l6-v2"},
        "clients": {"data": [{"path": str(private), "name": "medquad_private"}, {"builtin": "chatdoctor", "sample": args.dialogues},
                             {"builtin": "pubmed_abstracts", "sample": args.abstracts}],
                    "partition": {"method": "iid", "num_clients": 2, "names": CLIENTS}},
        "privacy": {"target_epsilon": epsilon, "unit": "record"},
        "audit": {"canaries": {"client": "hospital_a", "count": 32, "repeats": 4, "digits": 6}, "holdout_per_client": 10},
        "stages": ["prepare_models", "ingest",
                   {"name": "structure", "params": {"pool": {"path": str(public), "name": "medquad_public"}, "k": 3, "chunk_tokens": 192, "overlap_tokens": 32,
                                                    "max_chunks_per_document": 1, "sampling": {"do_sample": False, "max_new_tokens": 128}}},
                   {"name": "dp_train", "params": {"source_stage": "structure", "loss_on": "all", "epochs": args.epochs, "batch_size": 8, "max_length": 256,
                                                   "learning_rate": 0.002, "clip_norm": 1.0}}],
    }


def synthesis_stages(args, public: Path, synthetic_stage: str) -> list[dict]:
    return [
        {"name": "synthesize", "params": {"per_client": args.synthetic, "oversample": 2.0, "seeds": SEEDS,
                                          "sampling": {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95}, "response_max_new_tokens": 128,
                                          "min_words": 5, "max_words": 80}},
        {"name": "refine", "params": {"pool": {"path": str(public), "name": "medquad_public"}, "task": "a medical question a patient or clinician might ask",
                                      "shots": 3, "example_words": 40, "threshold": 0.5, "min_fluency": -6.5, "sampling": {"do_sample": False, "max_new_tokens": 64}}},
        {"name": "fedtune", "params": {"engine": "local", "synthetic_stage": synthetic_stage, "rounds": args.rounds, "rule": {"name": "fedavg"},
                                       "training": {"steps": args.local_steps, "batch_size": 4, "max_length": 192, "learning_rate": 0.002, "loss_on": "response"}}},
    ]


def evaluate(args, models: list[str]) -> dict:
    return {"name": "evaluate", "params": {"tasks": TASKS, "modes": ["logprob"], "models": models, "limit": args.limit, "fidelity": False}}


def fidelity_cells(run_a: Path, seed: int):
    """Fréchet distance of each row's synthetic data to the private data, mean over hospitals,
    computed here from run A's files (the benchmark stands in for the hospitals)."""
    from eval.audit import private_texts, synthetic_texts
    from eval.fidelity import fidelity_report
    from knowledgesg.models import resolve_device
    from knowledgesg.retrieval import embed, load_embedder
    from knowledgesg.runner import run_models

    models = run_models(run_a)
    embedder = load_embedder(models["embedder"]["path"], resolve_device("auto"))
    figures = {}
    for stage in ("synthesize", "refine"):
        reports = []
        for client in CLIENTS:
            synthetic = synthetic_texts(run_a, client, (stage,))
            reports.append(fidelity_report(private_texts(run_a, client), synthetic, lambda texts: embed(embedder, texts), seed))
        usable = [r for r in reports if "skipped" not in r]
        figures[stage] = (f"{sum(r['frechet_synthetic_vs_private'] for r in usable) / len(usable):.3f} "
                          f"(floor {sum(r['frechet_private_vs_private'] for r in usable) / len(usable):.3f})") if usable else "too few texts"

    def cells(row: Row) -> list[str]:
        return [figures[row.synthetic] if row.synthetic else "-"]

    return cells


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--medquad", type=int, default=60, help="private MedQuAD pairs")
    parser.add_argument("--dialogues", type=int, default=60, help="private GenMedGPT-5k dialogues")
    parser.add_argument("--abstracts", type=int, default=12, help="private PubMed abstracts, structured into pairs")
    add_run_arguments(parser, synthetic=16, seed=7, mia_members=40)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medicine-comparison-"))
    workdir.mkdir(parents=True, exist_ok=True)
    private, public = split_medquad(workdir, args.medquad, args.seed)
    audits = audit_argv(args)
    runs, times = run_three(workdir, lambda name, eps: base_spec(args, private, public, name, eps), lambda stage: synthesis_stages(args, public, stage),
                            lambda models: evaluate(args, models), 8.0, audits)
    write_result("medicine_comparison", [
        "# Medicine: the pipeline against the obvious private alternatives", "",
        f"Command: `{command()}`", f"Machine: {machine()}",
        f"Seed {args.seed}; private: {args.medquad} MedQuAD pairs (split from the public pool), {args.dialogues} GenMedGPT-5k dialogues, "
        f"{args.abstracts} PubMed abstracts over 2 hospitals ({count_lines(runs['A'], 'structure', 'records.jsonl')} training records once `structure` has turned the abstracts into pairs); "
        f"{count_lines(runs['A'], 'synthesize', 'synthetic.jsonl')} synthetic pairs kept by synthesize, {count_lines(runs['A'], 'refine', 'refined.jsonl')} after refine; "
        f"fedtune {args.rounds} rounds x {args.local_steps} local steps; accuracy by answer log-probability on {args.limit} seeded test items per task.", "",
        f"Audit: `ksg audit RUN --models M {' '.join(audits)}` with M = {AUDITED_MODELS}." if audits else "Audit: not run.", "",
        "| row | PubMedQA | MedQA | mean | Fréchet to private (floor) | synthetic texts with a private 8-word span | canary exposure (planted, bits of 19.9) | PII replays beyond base | epsilon (hospital_a) |",
        "|---|---|---|---|---|---|---|---|---|", *table(runs, TASKS, "hospital_a", 8.0, audits is not None, fidelity_cells(runs["A"], args.seed)),
        "", "Each client's own adapter (the DP and NOT PRIVATE rows are their means):", "", *per_client_table(runs, TASKS),
        "", "Times (wall clock; other jobs shared the 2 cores for much of it, so these are not speed figures):", *[f"- {k}: {v:.0f} s" for k, v in times.items()],
    ])


if __name__ == "__main__":
    main()

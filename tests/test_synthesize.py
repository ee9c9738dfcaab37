"""The synthesize and structure stages on the tiny models, through the runner."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from knowledgesg.cli import main
from knowledgesg.generation import Completion
from knowledgesg.prompts import Seed
from pipelines.synthesize import Synthesize, SynthesizeParams
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec

SEED = {"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.", "domain": "finance", "task": "sentiment"}
SYNTH = {"name": "synthesize", "params": {"per_client": 4, "labels": ["negative", "neutral", "positive"], "sampling": {"max_new_tokens": 16},
                                          "response_max_new_tokens": 6, "min_words": 1, "seeds": [SEED]}}
TRAIN = {"name": "dp_train", "params": {"batch_size": 4, "max_length": 48, "loss_on": "all"}}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def private_text_in(prompts: list[str], private_texts: list[str], n: int = 6) -> list[str]:
    """Private texts of which any n consecutive words appear in a prompt."""
    joined = [" ".join(re.findall(r"\w+", p.lower())) for p in prompts]
    leaks = []
    for text in private_texts:
        tokens = re.findall(r"\w+", text.lower())
        grams = {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))}
        if any(g and g in p for g in grams for p in joined):
            leaks.append(text)
    return leaks


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("synth")
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram"))])
    assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
    return workdir / "run"


def test_no_private_text_in_any_prompt_sent(synth_run: Path):
    # Pass-1 prompts are built by us from public seeds; pass-2 prompts add the DP model's own
    # output. Verbatim regurgitation by a real model would show up here too, as it should.
    for client in ("client_0", "client_1"):
        private = [r["input"] for r in _jsonl(synth_run / f"stages/ingest/clients/{client}/records.jsonl")]
        prompts = [row["prompt"] for row in _jsonl(synth_run / f"stages/synthesize/clients/{client}/prompts.jsonl")]
        first_pass = [row for row in _jsonl(synth_run / f"stages/synthesize/clients/{client}/prompts.jsonl") if row["pass"] == 1]
        assert len(first_pass) == 8 and all(SEED["instruction"] in row["prompt"] for row in first_pass)
        assert private_text_in(prompts, private) == []
        # the check itself can fail: a prompt carrying a private sentence is caught
        assert private_text_in(prompts + [f"Classify: {private[3]}"], private) == [private[3]]


def test_ledger_counts_the_histogram_and_calls_synthesis_free(synth_run: Path):
    ledger = json.loads((synth_run / "stages/synthesize/ledger.json").read_text())
    kinds = [(e["client_id"], e["release"].split(" ")[0], e["mechanism"]["kind"]) for e in ledger]
    assert kinds == [("client_0", "dp_label_histogram", "gaussian"), ("client_0", "synthetic_data", "post_processing"),
                     ("client_1", "dp_label_histogram", "gaussian"), ("client_1", "synthetic_data", "post_processing")]
    assert ledger[1]["epsilon"]["reported"] == 0.0 and ledger[0]["epsilon"]["reported"] > 0
    histogram = json.loads((synth_run / "stages/synthesize/clients/client_0/label_histogram.json").read_text())
    assert histogram["noise_std"] == 20.0 and histogram["sensitivity"] == 1 and set(histogram["labels"]) == {"negative", "neutral", "positive"}
    assert ledger[0]["noise"] == "os_entropy" and ledger[1]["noise"] == "none"
    assert main(["privacy-report", str(synth_run)]) == 0
    report = json.loads((synth_run / "privacy_report.json").read_text())
    total = report["clients"][0]["total"]["pld"]
    assert total > report["clients"][0]["releases"][0]["entry"]["epsilon"]["pld"]  # the histogram composed in


def test_synthesize_needs_dp_adapters(workdir: Path, capsys):
    spec = tiny_spec(stages=["prepare_models", "ingest", SYNTH])
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 2
    assert "spec.yaml: stages[2] (synthesize) needs stage 'dp_train' before it" in capsys.readouterr().err
    assert not (workdir / "run").exists()


def test_filter_keeps_well_formed_pairs_to_the_class_quota_with_provenance(tmp_path: Path):
    params = SynthesizeParams(per_client=2, labels=["negative", "positive"], seeds=[Seed(**SEED)], min_words=3)
    stage = Synthesize(params)
    texts = ["Profits rose sharply in the quarter", "Profits rose sharply in the quarter", "Sales fell for the third year running",
             "Too short", "Costs fell and margins widened strongly", "The bank cut its dividend amid losses", "Unfinished input text here",
             "Is this negative or positive news", "Shares rose today\nThe end of the story"]
    first = [Completion(t, 5, finished=(i != 6)) for i, t in enumerate(texts)]
    # an answer that names a label is complete even if it runs on (2); a second paragraph is cut (8)
    answers = {0: Completion("positive", 1, True), 1: Completion("positive", 1, True), 2: Completion("Negative. The sales of the", 8, False),
               3: Completion("positive", 1, True), 4: Completion("I think it is fine", 5, True), 5: Completion("negative", 1, True),
               7: Completion("positive", 1, True), 8: Completion("positive", 1, True)}

    class Ctx:
        def derive_seed(self, *parts):
            return 1

    seeds = [Seed(**SEED)] * len(texts)
    user_texts, complete, _ = stage.user_turns(seeds, first)
    assert user_texts[8] == "Shares rose today" and complete[8] and not complete[6]
    rows, stats = stage.filter(Ctx(), "c0", seeds, user_texts, complete, answers, "sha", [1.0, 1.0])
    assert [(r["input"], r["response"]) for r in rows] == [("Profits rose sharply in the quarter", "positive"), ("Sales fell for the third year running", "negative")]
    assert stats["rejected"] == {"input unfinished": 1, "input length": 1, "no label in response": 1, "exact duplicate": 1, "near duplicate": 0, "over class quota": 2,
                                 "input format (several paragraphs, or lists the answers)": 1}
    assert rows[0]["provenance"]["seed"]["domain"] == "finance" and rows[0]["provenance"]["adapter_sha256"] == "sha"
    assert rows[0]["source"] == "synthetic:c0" and rows[0]["instruction"] == SEED["instruction"]


def test_model_class_balance_keeps_the_labels_as_the_dp_model_writes_them():
    """No quota: the first per_client well-formed candidates, so the labels keep the proportions
    the DP model wrote them in (its learned prior), where a uniform prior evens them out."""
    texts = ["Profits rose sharply in the quarter", "Sales fell for the third year running", "The bank cut its dividend amid losses",
             "Costs fell and margins widened strongly", "Shares of the miner slid after the warning", "The retailer opened forty new stores",
             "Bond yields climbed to a record high", "The airline expects weaker summer demand", "Regulators approved the merger on Friday",
             "The insurer kept its full year outlook", "Oil prices steadied after a volatile week", "The chipmaker hired a new finance chief"]
    labels = ["neutral", "neutral", "positive", "neutral", "negative", "neutral", "neutral", "positive", "neutral", "neutral", "negative", "neutral"]
    answers = {i: Completion(label, 1, True) for i, label in enumerate(labels)}
    seeds = [Seed(**SEED)] * len(texts)

    class Ctx:
        def derive_seed(self, *parts):
            return 1

    def kept(balance: str) -> tuple[list[str], dict]:
        stage = Synthesize(SynthesizeParams(per_client=9, labels=["negative", "neutral", "positive"], seeds=[Seed(**SEED)], min_words=3, class_balance=balance))
        rows, stats = stage.filter(Ctx(), "c0", seeds, texts, [True] * len(texts), answers, "sha", [1.0, 1.0, 1.0])
        return [r["response"] for r in rows], stats

    responses, stats = kept("model")
    assert responses == labels[:9] and stats["quotas"] is None and stats["rejected"]["over per_client"] == 3
    uniform, stats = kept("uniform")
    assert sorted(Counter(uniform).values()) == [2, 2, 3] and stats["quotas"] == {"negative": 3, "neutral": 3, "positive": 3}
    with pytest.raises(ValueError, match="class_balance 'model' needs labels"):
        SynthesizeParams(seeds=[Seed(**SEED)], class_balance="model")


def test_unfinished_text_is_cut_after_its_last_full_sentence():
    from pipelines.synthesize import last_full_sentence

    assert last_full_sentence("Profits rose sharply. Then the firm said that") == "Profits rose sharply."
    assert last_full_sentence('He said "we grew!" and then') == 'He said "we grew!"'
    assert last_full_sentence("Rates rose 3.5") is None and last_full_sentence("no end at all") is None
    seed = Seed(**SEED)
    first = [Completion("Profits rose sharply in March. Then the firm", 48, False), Completion("Rates rose 3.5", 48, False)]
    texts, complete, cut = Synthesize(SynthesizeParams(seeds=[seed])).user_turns([seed, seed], first)
    assert texts[0] == seed.prefix + "Profits rose sharply in March." and complete == [True, False] and cut == [True, False]
    kept, _, _ = Synthesize(SynthesizeParams(seeds=[seed], cut_unfinished=False)).user_turns([seed, seed], first)
    assert kept[0] == seed.prefix + first[0].text  # the switch turns the cut off

    open_task = Synthesize(SynthesizeParams(seeds=[seed], min_words=3))

    class Ctx:
        def derive_seed(self, *parts):
            return 1

    answers = {0: Completion("It is caused by a virus. It spreads through", 96, False), 1: Completion("Usually about 3.5", 96, False)}
    rows, stats = open_task.filter(Ctx(), "c0", [seed, seed], ["What causes flu in winter?", "How long does a cold last?"], [True, True], answers, "sha", [])
    assert [r["response"] for r in rows] == ["It is caused by a virus."] and stats["responses_cut_at_a_sentence_end"] == 1
    assert rows[0]["provenance"]["raw_response"] == "It is caused by a virus. It spreads through"
    assert stats["rejected"]["response unfinished or empty"] == 1


def _structure_spec(workdir: Path, pool: dict, members: list[dict] | None = None, precision: str = "float32") -> Path:
    spec = tiny_spec(stages=["prepare_models", "ingest", {"name": "structure", "params": {
        "pool": pool, "chunk_tokens": 64, "overlap_tokens": 8, "max_chunks_per_document": 3, "example_words": 8,
        "sampling": {"do_sample": False, "max_new_tokens": 16}, "precision": precision}}])
    spec["models"]["embedder"] = "tiny-random-embedder"
    (workdir / "notes.jsonl").write_text("".join(json.dumps({"id": f"n{i}", "text": f"Patient {i} improved on therapy. " * 12}) + "\n" for i in range(4)))
    spec["clients"] = {"members": members or [{"id": "hosp", "data": [{"path": "notes.jsonl", "kind": "text"}, {"path": "data.jsonl"}]}]}
    return write_spec(workdir, spec)


def test_structure_chunks_retrieves_generates_and_passes_own_records_through(workdir: Path, capsys):
    spec = _structure_spec(workdir, {"builtin": "medquad", "sample": 30})
    assert main(["run", str(spec), "--run-dir", "run"]) == 0
    stats = json.loads((workdir / "run/stages/structure/clients/hosp/structure_stats.json").read_text())
    assert stats["chunks"] == 12 and stats["kept"] + sum(stats["rejected"].values()) == 12 and stats["precision"] == "float32"  # 4 notes, 3 chunks each
    records = _jsonl(workdir / "run/stages/structure/clients/hosp/records.jsonl")
    assert len([r for r in records if r["source"] == "data"]) == 40  # the client's own pairs, unchanged
    manifest = json.loads((workdir / "run/stages/structure/manifest.json").read_text())
    assert manifest["outputs"]["clients/hosp/records.jsonl"]["side"] == "client:hosp"
    assert "built index" in capsys.readouterr().err
    # a second run over the same pool reuses the cached index; it writes with bfloat16 weights
    spec = _structure_spec(workdir, {"builtin": "medquad", "sample": 30}, precision="bfloat16")
    assert main(["run", str(spec), "--run-dir", "run2"]) == 0
    assert "reused index" in capsys.readouterr().err
    stats = json.loads((workdir / "run2/stages/structure/clients/hosp/structure_stats.json").read_text())
    assert stats["precision"] == "bfloat16" and stats["kept"] + sum(stats["rejected"].values()) == 12


def test_structure_errors_for_an_empty_corpus_and_an_empty_pool(workdir: Path, capsys):
    spec = _structure_spec(workdir, {"builtin": "medquad", "sample": 30}, members=[{"id": "hosp", "data": [{"path": "data.jsonl"}]}])
    assert main(["run", str(spec), "--run-dir", "run"]) == 2
    assert "structure: client 'hosp' has no text records to structure" in capsys.readouterr().err
    (workdir / "pool.jsonl").write_text("")
    assert main(["run", str(_structure_spec(workdir, {"path": "pool.jsonl"})), "--run-dir", "run"]) == 2
    assert "pool.jsonl: no records" in capsys.readouterr().err
    assert main(["run", str(_structure_spec(workdir, {"builtin": "pubmed_abstracts"})), "--run-dir", "run"]) == 2
    assert "structure params.pool: the example pool pubmed_abstracts has 0 instruction records, fewer than the 3 needed" in capsys.readouterr().err


def test_a_dp_histogram_over_structures_pairs_is_refused_before_anything_is_written(workdir: Path, capsys):
    """The histogram counts ingest's labelled records: a client that holds text only, whose training
    pairs structure made from it, has none, so its histogram was noise alone, an epsilon spent for
    nothing. Labelled records beside the text are counted: that spec is accepted."""
    stages = [{"name": "dp_train", "params": {"source_stage": "structure", "batch_size": 2, "max_length": 48}},
              {"name": "synthesize", "params": dict(SYNTH["params"], class_balance="dp_histogram")}]
    text_only = yaml.safe_load(_structure_spec(workdir, {"builtin": "medquad", "sample": 30}, members=[{"id": "hosp", "data": [{"path": "notes.jsonl", "kind": "text"}]}]).read_text())
    text_only["stages"] += stages
    spec_file = write_spec(workdir, text_only)
    assert main(["run", str(spec_file), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert f"{spec_file}: synthesize params.class_balance: dp_histogram counts the labels of a client's instruction records, and client 'hosp' holds text only" in err, err
    assert len(err.strip().splitlines()) == 1 and not (workdir / "run").exists()
    both = yaml.safe_load(_structure_spec(workdir, {"builtin": "medquad", "sample": 30}).read_text())  # the notes and labelled records
    both["stages"] += stages
    assert main(["check", str(write_spec(workdir, both))]) == 0, capsys.readouterr().err


def test_structure_keep_rejects_ungrounded_unparseable_and_duplicates():
    from knowledgesg.chunking import Chunk
    from pipelines.structure import Structure

    chunks = [Chunk("pm/1", i, "Metformin lowers blood glucose in type 2 diabetes.", 0, 10) for i in range(4)]
    completions = [Completion(" What does metformin lower?\nAnswer: Metformin lowers blood glucose.", 9, True),
                   Completion(" What does metformin lower here?\nAnswer: Metformin lowers blood glucose.", 9, True),
                   Completion(" What cures cancer?\nAnswer: Chemotherapy always cures tumours.", 9, True),
                   Completion(" I cannot answer that.", 5, True)]
    document = Structure.keep("hosp", chunks, completions, min_grounding=0.5, user_id="patient-7")
    pairs = document.pairs
    assert [p["instruction"] for p in pairs] == ["What does metformin lower?"]
    # the pair's privacy unit is its source document (and its user, when the text has one)
    assert pairs[0]["document_id"] == "pm/1" and pairs[0]["user_id"] == "patient-7"
    assert document.rejected == {"duplicate": 1, "not grounded": 1, "unparseable": 1} and document.chunks == 4 and len(document.scores) == 1


def test_structure_with_a_labelled_pool_labels_the_chunks_key_sentence():
    from knowledgesg.chunking import Chunk
    from pipelines.structure import Structure, key_sentence

    text = "Good morning. Total revenue declined 7.5% versus last year, which exceeded our expectation. Thanks."
    assert key_sentence(text) == "Total revenue declined 7.5% versus last year, which exceeded our expectation."
    assert key_sentence("Hi. Thanks all.") is None
    instruction = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
    chunks = [Chunk("ects/1", i, text, 0, 20) for i in range(3)]
    sentences = [key_sentence(text), key_sentence(text), None]
    completions = [Completion(" negative", 1, True), Completion(" I am not sure", 4, True), Completion(" positive", 1, True)]
    document = Structure.keep_labelled("bank", chunks, sentences, [instruction] * 3, completions, ["negative", "neutral", "positive"], user_id=None)
    assert [(p["instruction"], p["input"], p["response"], p["document_id"]) for p in document.pairs] == [(instruction, sentences[0], "negative", "ects/1")]
    assert document.rejected == {"no label": 1, "no usable sentence": 1, "duplicate": 0}
    from pipelines.structure import client_stats

    stats = client_stats([document, document], document.pairs * 2, labelled=True)  # a reason counted 0 stays shown, as before per-document structuring
    assert stats["rejected"] == {"no label": 2, "no usable sentence": 2, "duplicate": 0} and stats["chunks"] == 6 and stats["labels"] == {"negative": 2}


def test_dirichlet_deals_text_records_out_evenly():
    from knowledgesg.partition import partition
    from knowledgesg.records import InstructionRecord, TextRecord
    from knowledgesg.spec import PartitionSpec

    records = [InstructionRecord(id=f"s/{i}", instruction="Q", response=["a", "b"][i % 2], source="s") for i in range(60)]
    records += [TextRecord(id=f"t/{i}", text="long text", source="t") for i in range(9)]
    clients = partition(records, PartitionSpec(method="dirichlet", num_clients=3, alpha=1.0), seed=0)
    assert [sum(r.kind == "text" for r in part) for part in clients.values()] == [3, 3, 3]
    assert sum(len(part) for part in clients.values()) == 69


def test_structure_fingerprint_covers_its_pool_file(workdir: Path):
    from knowledgesg.spec import load_spec
    from pipelines.structure import Structure, StructureParams

    (workdir / "pool.jsonl").write_text('{"instruction": "What is A1C?", "response": "A blood test."}\n')
    spec, base = load_spec(write_spec(workdir, tiny_spec()))
    stage = Structure(StructureParams(pool={"path": "pool.jsonl"}))
    assert stage.external_inputs(spec, base) == [workdir / "pool.jsonl"]


def test_histogram_budget_is_refused_before_any_client_works(workdir: Path, capsys):
    hist = dict(SYNTH, params=dict(SYNTH["params"], class_balance="dp_histogram", histogram_noise_multiplier=0.5))
    privacy = {"target_epsilon": 8.0, "cap_epsilon": 9.0}
    assert main(["run", str(write_spec(workdir, tiny_spec(stages=["prepare_models", "ingest", TRAIN], privacy=privacy))), "--run-dir", "run"]) == 0
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, hist], privacy=privacy)
    assert main(["run", str(write_spec(workdir, spec)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert "client 'client_0': the planned releases would exceed the privacy budget cap" in err and "synthesize client_0" not in err  # ksg run's plan
    assert (workdir / "run/stages/dp_train/manifest.json").is_file() and not (workdir / "run/stages/synthesize").exists()


def test_a_bfloat16_client_trains_and_samples(workdir: Path):
    """dp_train and synthesize with `precision: bfloat16` (as `auto` picks on a CPU with
    AVX512-BF16) run end to end; the client's own file says which precision ran."""
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    train = dict(TRAIN, params=dict(TRAIN["params"], precision="bfloat16"))
    spec = tiny_spec(stages=["prepare_models", "ingest", train, dict(SYNTH, params=dict(SYNTH["params"], precision="bfloat16"))])
    assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
    for client in ("client_0", "client_1"):
        stats = json.loads((workdir / f"run/stages/synthesize/clients/{client}/filter_stats.json").read_text())
        assert "precision" not in stats  # a server-side file: whether the client's CPU runs bfloat16 is its own (training.json says, client-side)
        assert len(_jsonl(workdir / f"run/stages/synthesize/clients/{client}/prompts.jsonl")) >= 8  # every candidate was sampled
        assert json.loads((workdir / f"run/stages/dp_train/clients/{client}/training.json").read_text())["dtype"] == "bfloat16"

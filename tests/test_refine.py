"""The refine stage on the tiny models: decisions, distillation, and what the server may read."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from knowledgesg.errors import KsgError
from knowledgesg.generation import Completion
from knowledgesg.manifest import read_manifest
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import load_spec
from knowledgesg.stage import StageContext
from pipelines.refine import Refine, RefineParams, balanced_shots, centre_by_group, centre_probabilities, decide, judge_prompt, label_prompt, label_shift_warnings, seed_key
from tests.conftest import run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from tests.test_synthesize import SYNTH, TRAIN

LABELS = ["negative", "neutral", "positive"]
REFINE = {"name": "refine", "params": {"pool": {"path": "pool.jsonl"}, "task": "financial news sentiment", "labels": LABELS, "keep_top_fraction": 0.5}}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def canned_generate(self, prompts, params, seed, progress=None):
    """The tiny random model rarely writes a usable pair; refine is what is tested here, so the
    synthetic candidates are fixed sentences (answers name a label, inputs vary in quality)."""
    if params.max_new_tokens == SYNTH["params"]["response_max_new_tokens"]:
        return [Completion(LABELS[i % 3], 1, True) for i in range(len(prompts))]
    texts = ["Shares of the bank fell sharply after it cut its outlook.", "Revenue grew in line with analyst expectations this quarter.",
             "zz qq the the the", "The company raised its dividend after record profits.", "my cat likes the sofa a lot today",
             "Oil prices slipped as inventories built up unexpectedly."]
    return [Completion(texts[i % len(texts)], 12, True) for i in range(len(prompts))]


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory):
    from knowledgesg.generation import Generator

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Generator, "generate", canned_generate)
    workdir = tmp_path_factory.mktemp("refine")
    write_jsonl(workdir / "data.jsonl", sentiment_rows(40))
    pool = [dict(r, id=f"pool{i}", input=f"Shares of firm {i} moved after the report.") for i, r in enumerate(sentiment_rows(9))]
    write_jsonl(workdir / "pool.jsonl", pool)
    synth = dict(SYNTH, params=dict(SYNTH["params"], per_client=6, oversample=1.0, near_duplicate_jaccard=0.9))
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, synth, REFINE], models={"base": "tiny-random-llama", "professional": "tiny-random-llama"})
    try:
        assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
    finally:
        monkeypatch.undo()
    return workdir


def test_every_candidate_has_scores_and_a_reasoned_decision(refine_run: Path):
    run = refine_run / "run"
    for client in ("client_0", "client_1"):
        synthetic = _jsonl(run / f"stages/synthesize/clients/{client}/synthetic.jsonl")
        decisions = _jsonl(run / f"stages/refine/clients/{client}/decisions.jsonl")
        refined = _jsonl(run / f"stages/refine/clients/{client}/refined.jsonl")
        assert synthetic, "the tiny model kept no synthetic pair: the test would prove nothing"
        assert [d["id"] for d in decisions] == [s["id"] for s in synthetic]
        assert all(0.0 <= d["judge_p_yes"] <= 1.0 and d["reason"].startswith("judge p(yes)") for d in decisions)
        assert not any("seed" in d or "judge_p_yes_centred" in d for d in decisions)  # the default compares every candidate of a client alike
        kept = [d for d in decisions if d["kept"]]
        assert len(kept) == len(refined) == -(-len(synthetic) // 2)  # top half, rounded up
        assert min(d["judge_p_yes"] for d in kept) >= max((d["judge_p_yes"] for d in decisions if not d["kept"]), default=0.0)
        for row, decision in zip(refined, kept):
            assert row["response"] in LABELS and row["response"] == max(decision["label_probs"], key=decision["label_probs"].get)
            assert row["provenance"]["refine"]["judge_p_yes"] == decision["judge_p_yes"]
            assert decision["label_changed"] == (decision["synthetic_response"] != row["response"])


def test_refine_counts_the_labels_it_was_given_and_kept_and_warns_where_its_own_took_one_away(refine_run: Path):
    stage = refine_run / "run/stages/refine"
    summary = json.loads((stage / "summary.json").read_text())
    synthetic = Counter(r["response"] for path in sorted((refine_run / "run/stages/synthesize/clients").glob("*/synthetic.jsonl")) for r in _jsonl(path))
    kept = Counter(r["response"] for path in sorted((stage / "clients").glob("*/refined.jsonl")) for r in _jsonl(path))
    assert summary["labels"] == {"synthetic": {label: synthetic[label] for label in LABELS}, "kept": {label: kept[label] for label in LABELS}}
    warnings = read_manifest(stage).warnings
    assert warnings == label_shift_warnings(synthetic, kept, LABELS, "professional")
    # the canned candidates are a third of each label; the tiny professional relabels the kept ones
    # with whatever its random weights prefer, so some label is taken away
    assert warnings and all("of the synthetic pairs and" in w and "label_source: dp keeps" in w for w in warnings)


def test_a_label_refine_takes_away_is_a_warning_and_a_small_or_rare_one_is_not():
    synthetic = Counter(negative=30, neutral=37, positive=33)
    (warning,) = label_shift_warnings(synthetic, Counter(negative=20, neutral=0, positive=80), LABELS, "professional")
    assert "label 'neutral' is 37% of the synthetic pairs and 0% of the 100 refine kept (label_source: professional)" in warning and "label_source: dp keeps" in warning
    assert label_shift_warnings(synthetic, Counter(negative=25, neutral=30, positive=45), LABELS, "professional") == []  # 37% to 30%: a shift, not a loss
    assert label_shift_warnings(Counter(negative=5, neutral=50, positive=45), Counter(neutral=50, positive=50), LABELS, "professional") == []  # 5%: too rare to tell
    (filtered,) = label_shift_warnings(synthetic, Counter(negative=40, neutral=2, positive=58), LABELS, "dp")
    assert "the judge and fluency filter dropped them" in filtered  # with the DP labels kept, only the filter can have done it
    assert label_shift_warnings(synthetic, Counter(), LABELS, "professional") == []  # nothing kept: the stage says so itself


def test_refine_opens_no_private_artifact(refine_run: Path):
    """Run the stage again under an audit hook; every file it opens in the run must be server side."""
    run = refine_run / "run"
    spec, _ = load_spec(refine_run / "spec.yaml")
    stage_dir = refine_run / "rerun"
    stage_dir.mkdir()
    opened: list[Path] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and recording:
            opened.append(Path(os.fsdecode(args[0])).resolve())

    recording = False
    sys.addaudithook(hook)
    cwd = os.getcwd()
    os.chdir(refine_run)
    try:
        recording = True
        ctx = StageContext(spec=spec, base_dir=refine_run, run_dir=run, stage_dir=stage_dir, stage_name="refine", runs_on="server")
        Refine(RefineParams.model_validate(REFINE["params"])).run(ctx)
    finally:
        recording = False
        os.chdir(cwd)
    in_run = [p for p in opened if p.is_relative_to(run.resolve())]
    assert any(p.name == "synthetic.jsonl" for p in in_run)  # the hook does see the stage's reads
    for path in in_run:
        stage = path.relative_to(run.resolve() / "stages").parts[0]
        relative = str(path.relative_to(run.resolve() / "stages" / stage))
        manifest = read_manifest(run / "stages" / stage)
        side = manifest.outputs[relative].side if relative in manifest.outputs else "server"
        assert side == "server", f"refine opened {stage}/{relative} ({side})"
    # the same audit catches a private read: the private records are client side in the manifest
    assert read_manifest(run / "stages/ingest").outputs["clients/client_0/records.jsonl"].side == "client:client_0"


def test_a_server_stage_is_refused_a_client_artifact(refine_run: Path):
    spec, _ = load_spec(refine_run / "spec.yaml")
    ctx = StageContext(spec=spec, base_dir=refine_run, run_dir=refine_run / "run", stage_dir=refine_run / "x", stage_name="refine", runs_on="server")
    with pytest.raises(KsgError, match="client:client_0 side"):
        ctx.artifact("ingest", "clients/client_0/records.jsonl")
    assert ctx.artifact("ingest", "partition.json").is_file()


def test_decide_by_threshold_and_by_rank():
    assert [v.kept for v in decide([0.2, 0.5, 0.9], 0.5, None)] == [False, True, True]
    verdicts = decide([0.2, 0.9, 0.9, 0.4], 0.5, 0.5)
    assert [v.kept for v in verdicts] == [False, True, True, False]
    assert verdicts[0].reason == "judge p(yes) 0.200 ranks 4 of 4; top 2 kept" and verdicts[0].dropped_by == "judge"
    both = decide([0.9, 0.9, 0.1], 0.5, None, fluency=[-5.0, -8.0, -8.0], min_fluency=-6.5)
    assert [(v.kept, v.dropped_by) for v in both] == [(True, None), (False, "fluency"), (False, "judge")]
    assert both[1].reason == "judge p(yes) 0.900 >= threshold 0.5; fluency -8.00 < -6.5"


def test_centring_by_seed_filters_each_style_alike():
    """Tweets read less fluently to the professional's base model, whose judge is shown public
    headlines; an absolute threshold then drops them wholesale (finance_headline's refine: 194 of
    446 tweet-style pairs against 101 of 454 news ones, refine_styles.md)."""
    news, tweets = [-4.0, -4.5, -5.0, -5.5, -6.0, -7.0], [-5.0, -5.5, -6.0, -6.5, -7.0, -8.0]
    seeds = ["news"] * 6 + ["tweet"] * 6

    def dropped(fluency: list[float]) -> dict[str, int]:
        verdicts = decide([0.9] * 12, 0.5, None, fluency=fluency, min_fluency=-6.2)
        return {seed: sum(not v.kept for v, s in zip(verdicts, seeds) if s == seed) for seed in ("news", "tweet")}

    assert dropped(news + tweets) == {"news": 1, "tweet": 3}  # uncentred: the tweets lose three times as many
    centred = centre_by_group(news + tweets, seeds)
    assert dropped(centred) == {"news": 2, "tweet": 2}
    assert sorted(centred[:6]) == pytest.approx(sorted(centred[6:]))  # the two differ by a shift only: centred, they coincide
    assert centre_by_group([1.0, 2.0, 3.0, 4.0, 5.0], ["a"] * 5) == [1.0, 2.0, 3.0, 4.0, 5.0]  # one group: unchanged
    # a seed with too few candidates to tell its median keeps its scores; the others still meet the median of all
    assert centre_by_group([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], ["a"] * 5 + ["b"]) == [1.5, 2.5, 3.5, 4.5, 5.5, 9.0]
    probabilities = centre_probabilities([0.97, 0.98, 0.99, 0.995, 0.999, 0.2, 0.3, 0.4, 0.5, 0.6], ["x"] * 5 + ["y"] * 5)
    assert all(0 < q < 1 for q in probabilities) and probabilities[7] > 0.4 and probabilities[2] < 0.99  # centred in logits: still probabilities


def test_a_candidate_is_grouped_by_its_whole_public_seed():
    news = {"instruction": "What is the sentiment of this news?", "prefix": "", "domain": "finance", "task": "sentiment"}
    prefixed = [{"instruction": "", "prefix": prefix, "domain": "medicine", "task": "qa"} for prefix in ("What causes", "How is")]
    rows = [{"instruction": "What causes gout?", "provenance": {"seed": prefixed[0]}}, {"instruction": "What causes anaemia?", "provenance": {"seed": prefixed[0]}},
            {"instruction": "How is it treated?", "provenance": {"seed": prefixed[1]}}, {"instruction": news["instruction"], "provenance": {"seed": news}}, {"instruction": "x"}]
    keys = [seed_key(row) for row in rows]
    assert keys[0] == keys[1] != keys[2] != keys[3] and keys[4] == ""  # a prefix seed is one group, whatever text each row wrote


def test_prompts_alternate_public_examples_and_balance_labels():
    prompt = judge_prompt("sentiment", ["good one", "good two"], ["bad one"], "candidate")
    assert prompt.index("good one") < prompt.index("bad one") < prompt.index("good two") < prompt.index("candidate")
    assert prompt.endswith("Text: candidate\nGood:")
    pool = [InstructionRecord(id=str(i), source="pool", instruction="Q?", input=f"text {i}", response=LABELS[i % 3 if i < 3 else 0]) for i in range(6)]
    assert [r.response for r in balanced_shots(pool, LABELS, 3)] == LABELS
    assert label_prompt(pool[:1], pool[4], 10).endswith("Instruction: Q?\nInput: text 4\nAnswer:")


def test_open_task_answers_are_written_by_the_professional_model():
    from knowledgesg.models import load_causal_lm, resolve_model
    from pipelines.refine import answer_prompt

    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    params = RefineParams.model_validate({"pool": {"builtin": "medquad"}, "task": "medical questions", "sampling": {"do_sample": False, "max_new_tokens": 6}})
    shots = [InstructionRecord(id="s", source="pool", instruction="What causes flu?", response="A virus spread by droplets.")]
    records = [InstructionRecord(id=f"r{i}", source="synthetic", instruction=f"What causes condition {i}?", response="unknown") for i in range(3)]
    assert answer_prompt(shots, records[0], 40).endswith("Question: What causes condition 0?\nAnswer:")

    class Ctx:
        def derive_seed(self, *parts):
            return 3

    answers = Refine(params).distil(Ctx(), "c", model, tokenizer, "cpu", records, shots, tuned=False)
    assert len(answers) == 3 and all(set(a) == {"response"} for a in answers)
    assert all(a["response"] is None or (a["response"] and "\n" not in a["response"]) for a in answers)  # one line, or dropped as empty

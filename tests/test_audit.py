"""Canaries, hold-outs, the audit and the evaluate stage on the tiny model, through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from eval.audit import AuditOptions, candidate_secrets, candidate_words, exposure, replay_rate, split_at_secret, training_curve
from eval.canaries import make_canaries, planted_records, rare_words, space_size
from eval.metrics import epsilon_lower_bound
from eval.pii import ENTITIES, analyzer, find_pii_spans
from eval.report import conclusion, pii_html
from knowledgesg.models import load_causal_lm, resolve_model
from knowledgesg.sft import tokenize_example
from knowledgesg.spec import RARE_WORDS, CanarySpec, CanaryTemplate
from tests.conftest import run_cli, run_in, sentiment_rows, tiny_spec, write_jsonl, write_spec
from knowledgesg.records import InstructionRecord
from tests.test_synthesize import TRAIN

CANARIES = {"client": "client_0", "count": 8, "repeats": 2, "digits": 2, "kinds": ["digits", "rare_words"], "words": 2}
CONTACTS = ["Maria Gonzalez", "John Whitaker", "Priya Raman", "Lars Eriksson"]


def rows_with_pii(n: int) -> list[dict]:
    """Sentiment rows, every fourth naming a contact and an e-mail: PII for the attacks."""
    rows = sentiment_rows(n)
    for i in range(0, n, 4):
        name = CONTACTS[(i // 4) % len(CONTACTS)]
        rows[i]["input"] += f" Contact {name} at {name.split()[0].lower()}.{i}@example.com for details."
    return rows


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("audit")
    write_jsonl(workdir / "data.jsonl", rows_with_pii(60))
    spec = tiny_spec(stages=["prepare_models", "ingest", TRAIN, {"name": "evaluate", "params": {"tasks": ["fpb", "medqa"], "limit": 6, "modes": ["logprob", "generation"]}}])
    spec["audit"] = {"canaries": CANARIES, "holdout_per_client": 6}
    assert run_in(workdir, "run", str(write_spec(workdir, spec)), "--run-dir", "run") == 0
    assert run_in(workdir, "audit", "run", "--candidates", "20", "--exposure-canaries", "8", "--samples", "2", "--bootstrap", "50") == 0
    return workdir / "run"


def test_ingest_plants_canaries_and_holds_records_out(audited_run: Path):
    ingest = audited_run / "stages/ingest"
    manifest = json.loads((ingest / "manifest.json").read_text())
    for name in ("clients/client_0/canaries.json", "clients/client_0/holdout.jsonl", "clients/client_1/holdout.jsonl"):
        assert manifest["outputs"][name]["side"].startswith("client:")  # the secrets stay with the client
    canaries = json.loads((ingest / "clients/client_0/canaries.json").read_text())["canaries"]
    planted = [c for c in canaries if c["included"]]
    records = [json.loads(line) for line in (ingest / "clients/client_0/records.jsonl").read_text().splitlines()]
    in_training = [r for r in records if r["source"] == "canary"]
    assert len(in_training) == 2 * len(planted) and 0 < len(planted) < len(canaries)
    assert all(any(c["secret"] in r["input"] for c in planted) for r in in_training)
    assert not any(c["secret"] in r["input"] for r in records for c in canaries if not c["included"] and f"Customer {c['name']} " in r["input"])
    holdout = {json.loads(line)["id"] for line in (ingest / "clients/client_0/holdout.jsonl").read_text().splitlines()}
    assert len(holdout) == 6 and not holdout & {r["id"] for r in records}
    assert not (ingest / "clients/client_1/canaries.json").exists()


def test_audit_report_has_every_section(audited_run: Path):
    report = json.loads((audited_run / "audit/audit_report.json").read_text())
    assert report["targets"] == ["dp_adapter:client_0", "dp_adapter:client_1"]
    assert "DP adapter" in report["releases"]["dp_adapter:client_0"]
    section = report["canaries"]
    assert section["count"] == 16 and set(section["kinds"]) == {"digits", "rare_words"}
    assert section["kinds"]["digits"]["method"] == "exact" and section["kinds"]["rare_words"]["method"].startswith("skew-normal")  # 100 digit secrets: enumerated
    canaries = section["targets"]["dp_adapter:client_0"]
    # the report rounds exposures to 4 decimals: a canary ranked first shows round(log2(100), 4)
    digit_exposures = [e for i, e in canaries["exposure"].items() if section["canaries"][int(i)]["kind"] == "digits"]
    assert len(canaries["exposure"]) == 16 and len(digit_exposures) == 8 and all(0 <= e <= round(np.log2(100), 4) for e in digit_exposures)
    assert len(canaries["loss_drop_vs_base"]) == 16
    # each canary is 2 records: the bound is about a group of 2, at the client's delta (its delta term included)
    claimed = canaries["claimed"]
    assert claimed["group_size"] == 2 and claimed["epsilon"] > report["claimed_epsilon"]["client_0"] and claimed["releases"] == ["dp_train: dp_adapter"]
    for kind, m in (("digits", 8), ("rare_words", 8), ("all", 16)):
        run = canaries["kinds"][kind]["one_run"]
        assert run["canaries"] == m and run["delta"] == pytest.approx(1e-5) and run["guesses"] in {t["guesses"] for t in run["tried"]}
        # the bound the report states is the one its own counts give, at the Bonferroni-corrected level
        # (16 canaries certify at most about 1 here, so a comparison with the claimed epsilon, about 8,
        # could not fail: the positive control below is where a bound is seen to rise)
        bound = epsilon_lower_bound(run["guesses"], run["correct"], run["confidence_each"], m, run["delta"])
        assert run["epsilon_lower_bound"] == pytest.approx(bound, abs=1e-4) and run["confidence"] == 0.95
        planted = run["planted"]
        ceiling = [min(r if in_only else r // 2, planted) + min(0 if in_only else r - r // 2, m - planted) for r, in_only in ((t["guesses"], t["in_only"]) for t in run["tried"])]
        assert run["largest_certifiable"] == pytest.approx(max(epsilon_lower_bound(t["guesses"], c, run["confidence_each"], m, run["delta"])
                                                             for t, c in zip(run["tried"], ceiling)), abs=1e-4)
    mia = report["membership_inference"]["dp_adapter:client_0|client_0"]
    assert set(mia["scores"]) == {"loss", "zlib", "reference", "min_k", "min_k_plus_plus", "rmia"} and mia["non_members"] == 6
    assert mia["members"] == 6  # by default as many members as non-members
    loss = mia["scores"]["loss"]
    assert {"tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr_ci", "auc_ci"} <= set(loss) and not loss["tpr_at_1pct_fpr_measurable"]
    pii = report["pii"]
    # 15 e-mails in 60 rows over two clients, a few held out: the holdout is chosen by content since 9dc2021 (9 here, 10 before)
    assert pii["by_type"].get("EMAIL_ADDRESS", 0) >= 8 and pii["attacked_spans"] > 0
    attacks = pii["models"]["dp_adapter:client_0"]["attacks"]
    assert attacks["inference"]["tried"] > 0 and 0 < attacks["inference"]["chance"] < 1
    assert all(0 <= attacks[a]["hits"] <= attacks[a]["tried"] for a in ("extraction", "reconstruction", "inference"))
    # the held-out control: each client's e-mails (one per record) by whether their record was trained on or held out
    assert pii["control"]["clients"] == ["client_0", "client_1"]
    pooled, own = pii["control"]["base"], pii["models"]["dp_adapter:client_1"]["control"]  # both clients' records; client_1's only
    assert pooled["trained"]["records"] > own["trained"]["records"] >= 1 and pooled["held_out"]["records"] > own["held_out"]["records"] >= 1
    for comparison in (pooled, own):
        assert comparison["difference_ci"][0] <= comparison["difference"] <= comparison["difference_ci"][1]
    for rate in (pii["base_replay_rate"], pii["models"]["dp_adapter:client_0"]["replay_rate"]):  # --samples 2: 8 samples per model
        assert rate["tried"] == pii["samples_per_model"] == 8 and 0 <= rate["hits"] <= 8 and rate["ci"][0] <= (rate["rate"] or 0) <= rate["ci"][1]
    for client in ("client_0", "client_1"):  # each DP adapter's training curve, from its client's loss.json
        losses = json.loads((audited_run / f"stages/dp_train/clients/{client}/loss.json").read_text())
        curve = report["training"]["releases"][f"dp_adapter:{client}"]
        assert curve["steps_with_loss"] == sum(e["loss"] is not None for e in losses) > 0 and curve["lowest"] <= min(curve["first"], curve["last"])
    page = (audited_run / "audit/audit_report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<pre>" not in page and "What to conclude" in page


def test_the_audit_page_renders_every_section_as_tables_and_figures(audited_run: Path, tmp_path: Path):
    from tests.test_user_facing import chromium_dom

    dom = chromium_dom(audited_run / "audit/audit_report.html", tmp_path / "profile")
    assert 'data-loaded="true"' in dom and 'data-loaded="false"' not in dom
    sections = re.split(r"<h2>", dom)[1:]
    assert [s.split("</h2>")[0] for s in sections] == ["Releases audited", "Training loss of the audited releases", "Canaries", "Membership inference",
                                                                 "Synthetic data: verbatim overlap", "PII"]
    for section in sections:  # each section shows its figures as tables or plots, never raw data
        assert "<table>" in section or "<img" in section or "No synthetic data" in section, section[:200]
        assert "{'" not in section and "<pre>" not in section
    assert dom.count("<img") >= 3 and "rare_words" in dom and "Targeted attacks" in dom


def test_evaluate_stage_scores_every_model(audited_run: Path):
    results = json.loads((audited_run / "stages/evaluate/results.json").read_text())
    assert set(results["models"]) == {"base", "dp_adapter:client_0", "dp_adapter:client_1", "dp (mean over clients)"}
    fpb = results["models"]["base"]["tasks"]["fpb"]
    assert fpb["logprob"]["n"] == 6 and 0 <= fpb["logprob"]["accuracy"] <= 1 and fpb["generation"]["n"] == 6
    assert results["models"]["base"]["tasks"]["medqa"]["logprob"]["n"] == 6


def test_exposure_of_unseen_canaries_is_near_zero():
    """On a model that never saw them, random canaries rank anywhere: exposure about 1.4 bits of 6.6."""
    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    spec = CanarySpec(client="x", count=12, digits=2)
    values = [exposure(model, tokenizer, spec, c, AuditOptions(batch_size=32), "cpu") for c in make_canaries(spec, seed=3)]
    assert np.mean(values) < 2.5 and max(values) <= np.log2(100)


def test_exposure_is_log2_of_the_candidates_less_log2_of_the_secrets_rank(monkeypatch):
    """exposure() on scripted losses (the model's place taken by a loss per secret): the checks of
    the audit above hold for any exposure in range, this one pins its values."""
    from scipy import stats

    from eval import audit

    def score_secrets(loss) -> None:  # every secret's loss, the canary's own included, from `loss`
        monkeypatch.setattr(audit, "own_secret_nll", lambda model, tokenizer, template, canaries, batch_size, device: [loss(c.secret) for c in canaries])
        monkeypatch.setattr(audit, "secret_nll", lambda model, tokenizer, template, canary, secrets, device: np.array([loss(s) for s in secrets], dtype=float))

    digits = CanarySpec(client="x", count=2, digits=2)  # 100 secrets: every one scored (exact)
    canary = make_canaries(digits, seed=3)[0]
    for rank in (1, 4, 50, 100):
        # losses 0..99 over the secrets, the canary's own at rank - 1: rank - 1 secrets below it
        score_secrets(lambda secret, rank=rank: float((int(secret) - int(canary.secret) + rank - 1) % 100))
        assert exposure(None, None, digits, canary, AuditOptions(), "cpu") == pytest.approx(np.log2(100) - np.log2(rank)), rank

    words = CanarySpec(client="x", count=2, kinds=["rare_words"], words=2)  # 4096^2 secrets: a skew-normal fit to a sample of them
    canary = make_canaries(words, seed=3)[0]
    sample_losses = 5.0 + stats.norm.ppf((np.arange(AuditOptions().candidates) + 0.5) / AuditOptions().candidates)  # N(5, 1), evenly in probability
    monkeypatch.setattr(audit, "secret_nll", lambda model, tokenizer, template, canary, secrets, device: sample_losses[: len(secrets)])
    for own, expected, tolerance in ((5.0, 1.0, 0.05), (5.0 + stats.norm.ppf(0.01), np.log2(100), 0.2), (-1e3, np.log2(4096**2), 1e-9), (1e3, 0.0, 1e-9)):
        assert exposure(None, None, words, canary, AuditOptions(), "cpu", own=own) == pytest.approx(expected, abs=tolerance), own


def test_a_model_that_memorised_its_planted_canaries_exposes_them_and_not_the_others():
    """Positive control of the canary measurements (the tiny model trained NOT PRIVATE on the
    planted canaries' secrets): each planted secret ranks first of the 100, its loss drops more
    than any unplanted one's, and the one-run audit certifies an epsilon above 0. The audit of the
    DP run above would pass with all of these at zero."""
    import torch

    from eval.audit import canary_results, own_secret_nll
    from knowledgesg.sft import IGNORE, Example, collate

    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    spec = CanarySpec(client="x", count=16, digits=2)
    canaries = make_canaries(spec, seed=1)  # 8 planted, and no secret twice (a twin of a planted secret would rank high too)
    planted = [c.included for c in canaries]
    assert sum(planted) == 8 and len({c.secret for c in canaries}) == 16
    before = own_secret_nll(model, tokenizer, spec.template, canaries, 32, "cpu")
    # the loss on the secret's tokens only: the template's 180 tokens would take most of the training
    rows = [split_at_secret(tokenizer, spec.template, c, c.secret) for c in canaries if c.included]
    batch = collate([Example(input_ids=p + s + a, labels=[IGNORE] * len(p) + s + [IGNORE] * len(a)) for p, s, a in rows], tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from a second thread, and on busy cores it ran 20x slower
    try:
        model.train()
        for _ in range(100):  # 80 steps memorise all 8 here (loss 0.04)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        after = own_secret_nll(model, tokenizer, spec.template, canaries, 32, "cpu")
        exposures = np.array([exposure(model, tokenizer, spec, c, AuditOptions(batch_size=32), "cpu") for c in canaries])
    finally:
        torch.set_num_threads(threads)
    planted = np.array(planted)
    assert exposures[planted].min() == pytest.approx(np.log2(100)) and exposures[~planted].mean() < 3, exposures
    drops = np.array(before) - np.array(after)
    assert drops[planted].min() > drops[~planted].max(), drops
    audited = canary_results(canaries, list(drops), AuditOptions(bootstrap=20), 1e-5, spec.include_probability)["all"]
    assert audited["one_run"]["epsilon_lower_bound"] > 0 and audited["membership"]["auc"] == 1.0


def test_canary_split_matches_training_tokenization():
    _, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    for template in (CanaryTemplate(), CanaryTemplate(instruction="Repeat the code.", input="", response="The code is {secret}.")):
        spec = CanarySpec(client="x", count=2, digits=4, kinds=["digits", "rare_words"], words=3, template=template)
        for canary in make_canaries(spec, seed=1):
            prefix, secret, after = split_at_secret(tokenizer, template, canary, canary.secret)
            trained = tokenize_example(tokenizer, canary.record(template), 512, "all").input_ids
            assert prefix + secret + after == trained
            assert tokenizer.decode(secret).strip() == canary.secret  # the secret's own tokens, nothing after it


def test_canary_losses_after_their_shared_prefix_equal_each_canary_alone():
    from eval.audit import own_secret_nll

    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    spec = CanarySpec(client="x", count=4, kinds=["digits", "rare_words"], words=2)
    canaries = make_canaries(spec, seed=1)
    together = own_secret_nll(model, tokenizer, spec.template, canaries, 3, "cpu")  # the shared-prefix path
    alone = [own_secret_nll(model, tokenizer, spec.template, [c], 1, "cpu")[0] for c in canaries]
    assert np.allclose(together, alone, atol=1e-3)


def test_rare_word_canaries_beside_digit_ones():
    spec = CanarySpec(client="x", count=30, kinds=["digits", "rare_words"], words=3)
    canaries = make_canaries(spec, seed=5)
    digits_only = make_canaries(CanarySpec(client="x", count=30), seed=5)
    assert canaries[:30] == digits_only  # adding a kind leaves the digit canaries as they were
    rare = canaries[30:]
    assert [c.index for c in canaries] == list(range(60)) and {c.kind for c in rare} == {"rare_words"}
    assert all(len(c.secret.split()) == 3 and set(c.secret.split()) <= set(rare_words()) for c in rare)
    assert len(rare_words()) == RARE_WORDS == 4096 and space_size(spec, "rare_words") == 4096**3
    words = [w for c in rare for w in c.secret.split()]
    assert len(set(words)) == len(words)  # no word in two canaries: an unplanted one never learns from a planted one
    with pytest.raises(ValueError, match="need 4100 distinct words"):
        CanarySpec(client="x", count=820, kinds=["rare_words"], words=5)
    secrets, exact = candidate_secrets(rare[0], spec, 25, 2000, seed=0)
    assert not exact and len(secrets) == 25 and rare[0].secret not in secrets and all(len(s.split()) == 3 for s in secrets)
    # exposure's candidates leave out the other canaries' words (their loss was lowered by their own training)
    pool = candidate_words(rare[0], canaries)
    others = {w for c in rare[1:] for w in c.secret.split()}
    secrets, _ = candidate_secrets(rare[0], spec, 25, 2000, seed=0, words=pool)
    assert len(pool) == 4096 - len(others) and not {w for s in secrets for w in s.split()} & others
    with pytest.raises(ValueError, match="each canary kind once"):
        CanarySpec(client="x", kinds=["digits", "digits"])


def test_the_synthetic_data_is_audited_for_the_canaries_it_carries():
    from eval.audit import synthetic_canary_audit

    spec = CanarySpec(client="x", count=40, kinds=["digits", "rare_words"], words=2)
    canaries = make_canaries(spec, seed=2)
    leaked = [c for c in canaries if c.included][:12]
    synthetic = [f"Customer {c.name} confirmed the wire transfer with security code {c.secret}." for c in leaked] + ["Shares rose 3% on strong demand."]
    claimed = {"epsilon": 8.0, "delta": 1e-5}
    audit = synthetic_canary_audit(canaries, synthetic, claimed, AuditOptions(bootstrap=20))
    assert audit["claimed"] == claimed and "synthetic data" in audit["release"]
    everything = audit["kinds"]["all"]
    assert everything["whole_secret_found_planted"] == 12 and everything["whole_secret_found_not_planted"] == 0
    assert next(t for t in everything["one_run"]["tried"] if t["guesses"] == 16 and t["in_only"])["correct"] >= 12  # its top 12 are the leaked planted ones
    assert everything["membership"]["tpr_at_1pct_fpr"] == pytest.approx(12 / everything["planted"], abs=1e-4)
    # a synthetic set that carries none: every score 0, nothing certified
    assert synthetic_canary_audit(canaries, synthetic[-1:], claimed, AuditOptions(bootstrap=0))["kinds"]["all"]["one_run"]["epsilon_lower_bound"] == 0.0


def test_planted_records_and_bad_canary_specs(tmp_path: Path):
    spec = CanarySpec(client="x", count=40, repeats=3)
    canaries = make_canaries(spec, seed=5)
    assert canaries == make_canaries(spec, seed=5) and len({c.secret for c in canaries}) == 40
    assert 10 < sum(c.included for c in canaries) < 30  # probability 1/2
    assert len(planted_records(spec, canaries, "x")) == 3 * sum(c.included for c in canaries)
    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(20))
    bad = tiny_spec()
    bad["audit"] = {"canaries": {"client": "nobody"}}
    result = run_cli("run", str(write_spec(tmp_path, bad)), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "audit.canaries.client: no client 'nobody'" in result.stderr
    bad["audit"] = {"canaries": {"client": "client_0", "template": {"input": "no secret here"}}}
    result = run_cli("run", str(write_spec(tmp_path, bad)), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "exactly once" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_audit_of_chosen_models(audited_run: Path, capsys):
    # this run released DP adapters only: asking for the final model alone is refused in one line
    assert run_in(audited_run.parent, "audit", "run", "--models", "final") == 2
    assert "no released model of the kinds asked for (final)" in capsys.readouterr().err
    assert run_in(audited_run.parent, "audit", "run", "--models", "dp,bogus") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ksg audit" in err and "models" in err


def test_overlap_ignores_the_public_instruction_and_finds_a_copied_sentence():
    from eval.audit import sharing_private_spans

    instruction = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
    private = [f"{instruction}\nThe company said operating profit of the Finnish group rose to EUR 12 million in the third quarter\nneutral"]
    fresh = f"{instruction}\nThe company said that shares of a retailer fell after weak holiday sales\nnegative"  # spans across the line break do not count
    copied = f"{instruction}\nWe hear operating profit of the Finnish group rose to EUR 12 million\npositive"
    assert sharing_private_spans([fresh, copied], private, [f"user\n{instruction}\n"], 8) == [copied]
    assert sharing_private_spans([fresh], private, [], 8) == [fresh]  # without the public prompts the instruction alone counts


def test_pii_in_a_repeated_text_is_found_at_every_index_it_occurs_as_if_each_text_were_analysed_alone():
    texts = ["Contact Maria Gonzalez at maria.gonzalez@example.com.", "neutral", "Contact Maria Gonzalez at maria.gonzalez@example.com.", "",
             "Call John Whitaker on 212-555-0143.", "neutral"]
    spans = find_pii_spans(texts)
    alone = []  # presidio's analysis of one text at a time, trimmed as find_pii_spans trims
    for index, text in enumerate(texts):
        for result in analyzer().analyze(text=text, language="en", entities=list(ENTITIES), score_threshold=0.4):
            raw = text[result.start : result.end]
            start = result.start + len(raw) - len(raw.lstrip())
            if len(raw.strip()) >= 4:
                alone.append((index, start, start + len(raw.strip()), raw.strip(), result.entity_type))
    assert sorted((s.text, s.start, s.end, s.value, s.kind) for s in spans) == sorted(alone)
    kinds = {(s.text, s.kind) for s in spans}
    assert {(0, "EMAIL_ADDRESS"), (2, "EMAIL_ADDRESS"), (4, "PHONE_NUMBER")} <= kinds and not {i for i, _ in kinds} & {1, 3, 5}


def test_a_pii_candidate_is_scored_on_its_own_tokens_its_sentence_or_the_record_from_it_on():
    from eval.audit import PiiTarget, candidate_pair
    from eval.pii import PiiSpan
    from knowledgesg.records import InstructionRecord

    _, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    text = "Please call Maria Gonzalez about the merger today. Shares rose on the news."
    record = InstructionRecord(id="r1", source="test", instruction="What is the sentiment of this news?", input=text, response="neutral")
    start = text.index("Maria")
    target = PiiTarget("client_0", record, "input", PiiSpan(text=0, start=start, end=start + len("Maria Gonzalez"), kind="PERSON", value="Maria Gonzalez"))
    trained = tokenize_example(tokenizer, target.with_value("John Whitaker"), 512, "all").input_ids
    before, value = candidate_pair(tokenizer, target, "John Whitaker", "value")
    same_before, to_the_end = candidate_pair(tokenizer, target, "John Whitaker", "record")
    also_before, sentence = candidate_pair(tokenizer, target, "John Whitaker", "sentence")
    assert before == same_before == also_before and tokenizer.decode(value).strip() == "John Whitaker"
    assert to_the_end[: len(value)] == value and len(to_the_end) > len(value) + 5
    assert before + to_the_end == trained[: len(before) + len(to_the_end)]  # tokenised as training saw the record
    assert "merger" in tokenizer.decode(to_the_end) and "merger" not in tokenizer.decode(value)
    # the sentence: the value and the rest of its sentence, the mark that ends it included, nothing after
    assert to_the_end[: len(sentence)] == sentence and tokenizer.decode(sentence).strip() == "John Whitaker about the merger today."
    assert "Shares" in tokenizer.decode(to_the_end)


def test_the_replay_rate_counts_samples_that_write_a_value_on_word_boundaries():
    values = {"Maria Gonzalez": "PERSON", "maria.4@example.com": "EMAIL_ADDRESS"}
    samples = ["Call Maria Gonzalez today.", "Write to maria.4@example.com and Maria Gonzalez.", "Maria Gonzalezville is a town.", "nothing here"]
    rate = replay_rate(values, samples)
    assert (rate["hits"], rate["tried"], rate["rate"]) == (2, 4, 0.5)  # a sample counts once; a value inside a longer word is no replay
    assert rate["ci"][0] < 0.5 < rate["ci"][1] and rate["ci"][1] - rate["ci"][0] > 0.5  # four samples say little
    assert replay_rate(values, [])["rate"] is None and replay_rate({}, samples)["hits"] == 0


def test_the_held_out_control_takes_values_found_in_no_other_record_field_or_client(tmp_path: Path):
    """A value seen anywhere else (another record, another field, a document, another client's data)
    may have been learnt there: it is no control, on either side."""
    from eval.audit import replay_controls

    def row(i: int, text: str, response: str = "neutral") -> dict:
        return InstructionRecord(id=f"d/{i}", source="d", instruction="What is the sentiment?", input=text, response=response).model_dump()

    def client(name: str, trained: list[dict], held: list[dict] | None = None) -> None:
        directory = tmp_path / "stages/ingest/clients" / name
        directory.mkdir(parents=True)
        write_jsonl(directory / "records.jsonl", trained)
        if held is not None:
            write_jsonl(directory / "holdout.jsonl", held)

    client("bank", [row(0, "Write to ada.7@example.com and bo.8@example.com today."), row(1, "Mail shared.1@example.com."),
                    row(2, "Again twice.2@example.com here."), row(3, "And twice.2@example.com there."),
                    row(4, "Nothing here.", response="fielded.3@example.com"),
                    {"kind": "text", "id": "doc/0", "source": "doc", "text": "Transcript naming documented.4@example.com."}],
           [row(5, "Reach cy.9@example.com now."), row(6, "Also shared.1@example.com."), row(7, "See fielded.3@example.com"),
            row(8, "And documented.4@example.com."), row(9, "Then elsewhere.5@example.com.")])
    client("other", [row(0, "Trained elsewhere.5@example.com here.")])  # trained at another client: no control for bank
    from knowledgesg.spec import load_spec

    write_jsonl(tmp_path / "data.jsonl", sentiment_rows(8))
    spec, _ = load_spec(write_spec(tmp_path, tiny_spec()))
    control = replay_controls(tmp_path, spec, ["bank", "other"], ("instruction", "input"))
    assert list(control) == ["bank"]  # only a client that held records out has a control
    assert control["bank"].trained == [["ada.7@example.com", "bo.8@example.com"]]  # one record: its values together
    assert control["bank"].held_out == [["cy.9@example.com"]]


def test_the_held_out_control_flags_memorisation_and_not_chance():
    from eval.audit import ReplayControl, control_comparison

    trained = [[f"t{i}.user@example.com", f"t{i}.alt@example.com"] for i in range(40)]
    held = [[f"h{i}.user@example.com"] for i in range(20)]
    controls = [ReplayControl(trained, held)]
    memorised = [f"Contact {values[0]} or {values[1]} please." for values in trained[:20]] + ["nothing private"]
    result = control_comparison(controls, memorised)
    assert (result["trained"]["replayed"], result["trained"]["records"], result["trained"]["values"]) == (20, 40, 80)  # records count, not values
    assert result["held_out"]["replayed"] == 0 and result["difference"] == 0.5 and result["more_than_held_out"] and result["difference_ci"][0] > 0
    chance = [f"Contact {values[-1]} please." for values in trained[:10] + held[:5]]  # a quarter of each, as common values would be written
    result = control_comparison(controls, chance)
    assert result["difference"] == 0.0 and not result["more_than_held_out"] and result["difference_ci"][0] < 0 < result["difference_ci"][1]
    assert control_comparison([ReplayControl(trained, [])], memorised) is None and control_comparison(controls, []) is None


def test_the_audit_conclusion_tells_a_breach_a_measured_leak_and_an_audit_without_power_apart():
    def run(bound: float, ceiling: float) -> dict:
        return {"epsilon_lower_bound": bound, "largest_certifiable": ceiling, "confidence": 0.95}

    assert conclusion(run(3.1, 3.66), 2.0).startswith("VIOLATION")
    assert conclusion(run(0.5, 3.66), 2.0).startswith("Consistent with the claim: leakage measured") and "could not" not in conclusion(run(0.5, 3.66), 2.0)
    assert "could not have caught a breach" in conclusion(run(0.5, 1.2), 8.0)  # leakage measured, but under a ceiling below the claim
    assert "could not have caught a breach" in conclusion(run(0.0, 1.2), 8.0)  # the ceiling sits below the claim
    assert "could certify up to 3.66" in conclusion(run(0.0, 3.66), 1.0) and "could not have caught" not in conclusion(run(0.0, 3.66), 1.0)
    assert "audit shows leakage" in conclusion(run(2.0, 3.66), float("inf")) and "does not show the release is private" in conclusion(run(0.0, 3.66), None)
    assert conclusion(None, 8.0).startswith("No one-run bound")


def test_a_release_whose_training_loss_rose_again_at_the_end_is_flagged_in_its_conclusion():
    """A NOT PRIVATE run that diverged late forgot its canaries (AUC 0.53 against 0.98): its low bound must not read as privacy."""
    steady = [{"step": i + 1, "loss": 3.0 - 2.0 * i / 299} for i in range(300)]
    diverged = [{"step": i + 1, "loss": 1.0 if i < 200 else 1.0 + 2.2 * (i - 200) / 99} for i in range(300)]
    noisy_dp = [{"step": i + 1, "loss": None if i % 7 == 0 else 4.6 - 0.5 * i / 299 + (0.3 if i % 2 else -0.3)} for i in range(300)]
    assert not training_curve(steady)["rose_at_end"] and training_curve(steady)["last"] == pytest.approx(1.1, abs=0.01)
    flagged = training_curve(diverged)
    assert flagged["rose_at_end"] and flagged["lowest"] == pytest.approx(1.0) and flagged["last"] > 2.5
    assert not training_curve(noisy_dp)["rose_at_end"] and training_curve(noisy_dp)["steps_with_loss"] == 300 - 43  # steps with no sampled unit have no loss
    assert training_curve([{"step": 1, "loss": None}]) is None and training_curve([]) is None
    run = {"epsilon_lower_bound": 0.08, "largest_certifiable": 3.66}
    assert "CAUTION" in conclusion(run, float("inf"), flagged) and "CAUTION" not in conclusion(run, float("inf"), training_curve(steady))
    assert conclusion(run, 8.0, flagged).startswith("Consistent with the claim") and "forgotten" in conclusion(run, 8.0, flagged)


def test_the_report_names_how_the_pii_candidates_were_ranked_for_every_score():
    """Each `--pii-score` choice is said in words (`sentence` once printed "ranked by None")."""
    section = {"private_pii_values": 1, "replayed_in_synthetic": 0, "synthetic_texts": 0, "by_type": {"PERSON": 1}, "models": {}}
    for score in get_args(AuditOptions.model_fields["pii_score"].annotation):
        page = pii_html({**section, "candidate_score": score})
        ranked = re.search(r"candidates ranked by ([^.<]+)", page).group(1)
        assert "None" not in ranked and ("sentence" in ranked) == (score == "sentence"), (score, ranked)


def test_extraction_samples_are_as_long_as_each_span_value_needs(monkeypatch):
    from eval import audit
    from eval.audit import PiiTarget, extraction_samples
    from eval.pii import PiiSpan
    from knowledgesg.records import InstructionRecord

    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    targets = []
    for i, value in enumerate(["Maria", "Flat 4, 1200 Kingsbridge Road, Upper Westfield, Northamptonshire"]):
        text = f"Please write to {value} about the merger today."
        record = InstructionRecord(id=f"r{i}", source="test", instruction="What is the sentiment of this news?", input=text, response="neutral")
        start = text.index(value)
        targets.append(PiiTarget("client_0", record, "input", PiiSpan(text=i, start=start, end=start + len(value), kind="LOCATION", value=value)))
    budgets = [len(tokenizer(t.span.value, add_special_tokens=False)["input_ids"]) + 4 for t in targets]
    assert budgets[1] > budgets[0] + 5
    calls = []
    real_generate = audit.Generator.generate

    def generate(self, prompts, params, seed, progress=None, budgets=None):
        completions = real_generate(self, prompts, params, seed, progress, budgets)
        calls.append((budgets, [c.new_tokens - c.finished for c in completions]))
        return completions

    monkeypatch.setattr(audit.Generator, "generate", generate)
    samples = extraction_samples(model, tokenizer, targets, 3, seed=0, device="cpu")
    assert [len(group) for group in samples] == [3, 3]
    assert [b for b, _ in calls] == [[budgets[0]] * 3 + [budgets[1]] * 3]  # one batched call, each span's samples under its own budget
    assert all(n <= budget for own, lengths in calls for n, budget in zip(lengths, own))


def test_reconstruction_ranks_what_the_samples_wrote_and_misses_without_the_true_value(monkeypatch):
    """Reconstruction hits only when the samples wrote the true value and it ranks first among the
    values they wrote; where they never wrote it, their values are not scored at all."""
    from eval import audit
    from eval.audit import AuditOptions, PiiTarget, pii_attacks
    from eval.pii import PiiSpan
    from knowledgesg.records import InstructionRecord

    written = [["Anna Berg", "Tom Hale"], ["Tom Hale", "Lena Roth"], ["Lena Roth", "Maria Santos"]]  # span 0 wrote its true value; 1 and 2 did not / did
    truth = ["Anna Berg", "Kurt Maier", "Maria Santos"]
    targets = []
    for i, value in enumerate(truth):
        text = f"Please write to {value} about the merger."
        record = InstructionRecord(id=f"r{i}", source="test", instruction="Sentiment?", input=text, response="neutral")
        targets.append(PiiTarget("client_0", record, "input", PiiSpan(text=i, start=16, end=16 + len(value), kind="PERSON", value=value)))
    found = {"client_0": {v: "PERSON" for v in [*truth, "Tom Hale", "Lena Roth", "Omar Diaz"]}}
    monkeypatch.setattr(audit, "extraction_samples", lambda model, tokenizer, targets, n, seed, device: [[f"{v}." for v in group] for group in written])
    monkeypatch.setattr(audit, "find_pii_spans", lambda texts: [PiiSpan(k, 0, len(t) - 1, t[:-1], "PERSON") for k, t in enumerate(texts)])
    monkeypatch.setattr(audit, "candidate_pair", lambda tokenizer, target, value, scored: ([target.span.text], [value]))
    loss = {"Anna Berg": 1.0, "Tom Hale": 2.0, "Lena Roth": 0.5, "Kurt Maier": 3.0, "Maria Santos": 0.9, "Omar Diaz": 5.0}
    scored = []

    def continuations_nll(model, tokenizer, pairs, device):
        scored.extend((prefix[0], value[0]) for prefix, value in pairs)
        return np.array([loss[value[0]] for _, value in pairs])

    monkeypatch.setattr(audit, "continuations_nll", continuations_nll)
    results = pii_attacks(None, None, targets, found, AuditOptions(pii_attack_samples=2, pii_candidates=2), "cpu")
    assert [r["reconstructed"] for r in results] == [True, False, False]  # span 2's true value was written, but Lena Roth ranks first
    assert sum(k == 1 for k, _ in scored) == 2  # span 1: its two inference candidates only (its samples never wrote Kurt Maier)
    assert {(0, "Anna Berg"), (0, "Tom Hale"), (2, "Lena Roth"), (2, "Maria Santos")} <= set(scored)
    assert len(scored) == len(set(scored))  # a value both attacks rank is scored once


def test_canaries_never_share_a_secret():
    """At 32 canaries of 3 digits, independent draws shared a secret for 94 of 200 seeds (birthday)."""
    spec = CanarySpec(client="x", count=32, digits=3)
    for seed in range(50):
        secrets = [c.secret for c in make_canaries(spec, seed)]
        assert len(set(secrets)) == len(secrets)


@pytest.mark.parametrize("unit", ["user", "source_document"])
def test_members_are_records_dp_train_trained_on(tmp_path: Path, unit: str):
    """dp_train keeps each unit's first max_records_per_user records (a user's, or a source
    document's where the spec says the records come from documents); a member drawn from the rest
    was never trained on, and would pull the attack's AUC towards chance. At the document unit
    every record had been taken as a member (a helper's review)."""
    from eval.audit import mia_records
    from knowledgesg.spec import load_spec

    clients = tmp_path / "run/stages/ingest/clients/client_0"
    clients.mkdir(parents=True)
    owner = {"user_id": "u{u}"} if unit == "user" else {"document_id": "doc{u}"}
    rows = [InstructionRecord(id=f"d/{u}-{k}", source="d", client_id="client_0", instruction=f"Q {u} {k}", response="yes",
                              **{field: value.format(u=u) for field, value in owner.items()}).model_dump()
            for k in range(10) for u in range(4)]
    write_jsonl(clients / "records.jsonl", rows)
    write_jsonl(clients / "holdout.jsonl", rows[:2])
    trained = tmp_path / "run/stages/dp_train/clients/client_0"
    trained.mkdir(parents=True)
    (trained / "privacy.json").write_text(json.dumps({"unit": unit, "max_records_per_unit": 3}))
    write_jsonl(tmp_path / "data.jsonl", [dict(r, doc=f"doc{i}") for i, r in enumerate(sentiment_rows(8))])
    data = [{"path": "data.jsonl", **({"fields": {"document_id": "doc"}} if unit == "source_document" else {})}]
    spec, _ = load_spec(write_spec(tmp_path, tiny_spec(data=data, privacy={"target_epsilon": 8.0, "unit": "user" if unit == "user" else "record"},
                                                        stages=["prepare_models", "ingest", {"name": "dp_train", "params": {"max_records_per_user": 3}}])))
    members, _ = mia_records(tmp_path / "run", spec, "client_0", AuditOptions(mia_members=40))
    assert len(members) == 12 and all(int(m.id.rsplit("-", 1)[1]) < 3 for m in members)


def test_the_zlib_score_is_over_the_text_it_scores():
    """Records cut to max_length are scored on the tokens kept (the last ones): two records alike
    there, cut from beginnings of other lengths, have the same log-probabilities and so the same
    zlib score (zlib's entropy had been the whole record's, adding the cut part's length)."""
    from eval.audit import AuditOptions, mia_scores, mia_sequences

    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    tail = " Revenue of the company rose by eleven percent in the quarter, the report said." * 3
    records = [InstructionRecord(id=f"d/{i}", source="d", instruction="Summarise.", input=head + tail, response="up")
               for i, head in enumerate(["Short head.", "A much longer head that goes on and on about margins, costs and guidance. " * 4])]
    sequences = mia_sequences(tokenizer, records, max_length=24)
    assert sequences[0] == sequences[1] and len(sequences[0]) == 24
    scores = mia_scores(model, tokenizer, [np.zeros(23)] * 2, sequences, AuditOptions(), "cpu")
    assert scores["zlib"][0] == scores["zlib"][1] and scores["loss"][0] == scores["loss"][1]


def test_a_clients_dp_adapter_is_charged_with_its_own_clients_pii_only():
    """A value only client B holds cannot leak through A's adapter, which never saw B's records: the
    replay count had been taken against every client's values for every adapter."""
    from eval.audit import values_trained_on

    by_client = {"A": {"ann@example.com": "EMAIL"}, "B": {"Zebulon Quartz": "PERSON"}}
    found = {value: kind for values in by_client.values() for value, kind in values.items()}
    assert values_trained_on("dp_adapter:A", by_client, found) == {"ann@example.com": "EMAIL"}
    assert values_trained_on("final", by_client, found) == found

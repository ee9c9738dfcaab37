"""Log-likelihood scoring: batched, left-padded, last-positions-only logits equal one-at-a-time scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knowledgesg.generation import SHARED_PREFIX_MIN
from knowledgesg.models import load_causal_lm, resolve_model
from knowledgesg.scoring import choice_logprobs, continuation_logprobs, normalized_choice_probs, token_statistics



@pytest.fixture(autouse=True)
def small_head_slices(monkeypatch):
    """The tiny model's 259-token vocabulary in ragged slices of 40 (a real model's 49k or 262k
    take HEAD_CHUNK at a time): every test here crosses slices."""
    from knowledgesg import scoring

    monkeypatch.setattr(scoring, "HEAD_CHUNK", 40)

def test_batched_scores_equal_one_sequence_at_a_time():
    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    texts = [("Instruction: the sentiment?\nInput: shares fell\nAnswer:", " negative"), ("Hi", " there, friend"), ("A much longer context " * 5, "x"),
             ("Hi", "y"), ("Hi", "z"), ("Answer:", "x")]  # one-token continuations after a shared context take the shared path
    contexts = [tok(c)["input_ids"] for c, _ in texts]
    continuations = [tok(t, add_special_tokens=False)["input_ids"] for _, t in texts]
    assert sum(len(c) == 1 for c in continuations) >= 4
    got = continuation_logprobs(model, contexts, continuations, tok.pad_token_id, batch_size=3)
    for context, continuation, scores in zip(contexts, continuations, got):
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([context + continuation])).logits.float().log_softmax(-1)[0]
        reference = [float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(continuation)]
        assert len(scores) == len(continuation)
        assert np.allclose(scores, reference, atol=1e-5)


def test_choice_table_and_normalisation():
    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    table = choice_logprobs(model, tok, ["Answer:", "Other answer:"], [" yes", " no", " maybe"], batch_size=2)
    assert table.shape == (2, 3) and (table < 0).all()
    probs = normalized_choice_probs(table)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(np.log(probs[:, 0] / probs[:, 1]), table[:, 0] - table[:, 1])


def test_token_statistics_after_a_shared_prefix_equal_each_sequence_alone():
    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    head = tok("System: you label financial news. Instruction: what is the sentiment of this sentence?", add_special_tokens=False)["input_ids"]
    assert len(head) >= SHARED_PREFIX_MIN
    tails = [" Shares fell 3% after the results.", " Profit rose.", " The bank kept its outlook for the year unchanged, as expected.", "!"]
    sequences = [head + tok(t, add_special_tokens=False)["input_ids"] for t in tails]
    sequences.append(sequences[2][5:])  # cut from the left, as a long record is: it stands apart from the group
    shared = token_statistics(model, sequences, tok.pad_token_id, batch_size=3)  # the group of four takes the shared-prefix path
    for sequence, got in zip(sequences, shared):
        alone = token_statistics(model, [sequence], tok.pad_token_id)[0]  # one sequence: the plain path
        assert len(got["logprobs"]) == len(sequence) - 1
        for key in ("logprobs", "mu", "sigma"):
            assert np.allclose(got[key], alone[key], atol=1e-4), key


@pytest.mark.parametrize("head", ["sliced", "whole logits"])
def test_token_statistics_equal_the_whole_distribution_computed_directly(head, monkeypatch):
    """Min-K%++'s mean and std of log p, and each token's log p, against float64 sums over the
    model's full next-token distribution: from the output head a ragged slice of the vocabulary
    at a time (a Llama), or from the model's whole logits a few positions at a time (an
    architecture whose head is not known to factor)."""
    import torch

    from knowledgesg import scoring
    from knowledgesg.scoring import STATISTICS_CHUNK

    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    if head == "sliced":
        assert model.config.vocab_size % scoring.HEAD_CHUNK and model.config.vocab_size > 3 * scoring.HEAD_CHUNK
    else:
        monkeypatch.setattr(scoring, "FACTORED_HEADS", frozenset())
    calls = []
    real_head_statistics = scoring._head_statistics
    monkeypatch.setattr(scoring, "_head_statistics", lambda *args, **kwargs: calls.append(1) or real_head_statistics(*args, **kwargs))
    sequences = [tok(t, add_special_tokens=False)["input_ids"] for t in ["Shares fell 3% after the weak results were published this morning.", "Profit rose.", "ok then"]]
    assert sum(len(s) for s in sequences) > 2 * STATISTICS_CHUNK  # the chunks cross rows and padding
    got = token_statistics(model, sequences, tok.pad_token_id, batch_size=3)
    logprobs_only = token_statistics(model, sequences, tok.pad_token_id, batch_size=3, moments=False)
    for sequence, stats, light in zip(sequences, got, logprobs_only):
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([sequence])).logits[0, :-1].double().log_softmax(-1)
        p = logp.exp()
        mean = (p * logp).sum(-1)
        std = ((p * (logp - mean[:, None]) ** 2).sum(-1)).sqrt()
        own = logp.gather(1, torch.tensor(sequence[1:])[:, None]).squeeze(1)
        assert np.allclose(stats["logprobs"], own.numpy(), atol=1e-4) and np.allclose(stats["mu"], mean.numpy(), atol=1e-4)
        assert np.allclose(stats["sigma"], std.numpy(), atol=1e-3)
        assert np.allclose(light["logprobs"], own.numpy(), atol=1e-4) and not light["mu"].any()
    assert bool(calls) == (head == "sliced")


@pytest.mark.parametrize("cap", [None, 30.0])
def test_head_statistics_a_slice_at_a_time_equal_those_of_the_whole_logits(cap, monkeypatch):
    """Logits of tens of nats, whose maximum sits in a later slice for some rows (the running
    maximum must rescale what came before), with and without Gemma 2's final soft cap."""
    from knowledgesg import scoring

    monkeypatch.setattr(scoring, "HEAD_CHUNK", 10)
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 5, 16, generator=generator) * 4, torch.randn(103, 16, generator=generator)
    targets = torch.randint(0, 103, (3, 5), generator=generator)
    logits = torch.nn.functional.linear(hidden, weight)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    assert logits.abs().max() > 25 and len(set(logits.argmax(-1).flatten().div(10, rounding_mode="floor").tolist())) > 3
    for moments in (True, False):
        expected = scoring._distribution_statistics(logits, targets, moments)
        got = scoring._head_statistics(hidden, targets, weight, cap, moments)
        for name, a, b in zip(("mean", "std", "log p"), expected, got):
            assert torch.allclose(a, b, atol=1e-4), (name, moments)


def test_contexts_that_begin_alike_run_their_prefix_once_and_score_as_each_whole_sequence(monkeypatch):
    """next_token_logprobs (one-token choices) and the multi-token rows of continuation_logprobs
    run the contexts' common prefix once; every score equals scoring the whole sequence alone."""
    from knowledgesg import scoring

    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    head = "Examples of financial sentiment. Input: shares fell. Answer: negative. Input: profit rose. Answer: positive. Input: "
    contexts = [tok(head + t + " Answer:")["input_ids"] for t in ["the bank kept its outlook", "revenue missed badly", "ok"]]
    continuations = [tok(t, add_special_tokens=False)["input_ids"] for t in ["x", " negative and more", " x y z w"]]
    assert len(continuations[0]) == 1 and min(len(c) for c in continuations[1:]) > 1
    prefixes = []
    real_run_prefix = scoring.run_prefix
    monkeypatch.setattr(scoring, "run_prefix", lambda model, prefix, device: prefixes.append(len(prefix)) or real_run_prefix(model, prefix, device))
    pairs = [(c, k) for c in contexts for k in continuations]  # each context with one-token and multi-token continuations
    got = continuation_logprobs(model, [c for c, _ in pairs], [k for _, k in pairs], tok.pad_token_id, batch_size=2)
    assert len(prefixes) == 2 and min(prefixes) >= SHARED_PREFIX_MIN  # once for the one-token rows, once for the rest
    for (context, continuation), scores in zip(pairs, got):
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([context + continuation])).logits.float().log_softmax(-1)[0]
        reference = [float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(continuation)]
        assert np.allclose(scores, reference, atol=1e-5)


def test_prefixed_scores_of_many_prefixes_equal_scoring_each_whole_sequence():
    """The audit's candidates for several PII spans at once: prefixes of different lengths
    (left-padded together in one batch), several rows per prefix, continuations of different
    lengths, batches that split a prefix's rows."""
    from knowledgesg.scoring import prefixed_logprobs

    model, tok = load_causal_lm(resolve_model("tiny-random-llama"))
    prefixes = [tok(t)["input_ids"] for t in ["The secret code of the vault is", "Call", "Our client, whose address we keep on file, lives at"]]
    tails = ["x", " 1234 .", " 99", " 31415926 and more text", " Jane Doe on Monday ."]
    pairs = [(p, tok(t, add_special_tokens=False)["input_ids"]) for p in prefixes for t in tails[: 2 + len(p) % 4]]
    pairs.append(pairs[1])  # a pair twice
    assert len({len(p) for p, _ in pairs}) == 3 and len({len(c) for _, c in pairs}) > 2 and min(len(c) for _, c in pairs) == 1
    # one row a batch; rows of one prefix split over batches, and batches of two prefixes; everything in one
    for budget in (1, 40, 4096):
        got = prefixed_logprobs(model, pairs, tok.pad_token_id, tokens_per_batch=budget)
        for (prefix, continuation), scores in zip(pairs, got):
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([prefix + continuation])).logits.float().log_softmax(-1)[0]
            reference = [float(logprobs[len(prefix) - 1 + j, token]) for j, token in enumerate(continuation)]
            assert len(scores) == len(continuation)
            assert np.allclose(scores, reference, atol=1e-5), budget


def test_token_budget_batches_pad_to_their_longest_row_within_the_budget():
    from knowledgesg.scoring import _token_budget_batches

    assert _token_budget_batches([10, 2, 9], 4) == [[0], [1], [2]]  # the 2 may not take the 9 in: 18 tokens
    assert _token_budget_batches([5, 5, 3, 2, 2, 2], 10) == [[0, 1], [2, 3, 4], [5]]
    assert _token_budget_batches([], 10) == []


def test_a_gemma_with_a_final_logit_cap_scores_as_its_own_logits():
    """Gemma's head (tied to its embeddings) and Gemma 2's final soft cap, set on a tiny random
    Gemma 3 whose logits reach well into the cap: the sliced head gives the model's own numbers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from knowledgesg.scoring import _factored_head, prefixed_logprobs

    config = Gemma3TextConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=8, final_logit_softcapping=5.0, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    assert _factored_head(model) is not None
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 301, (n,), generator=generator).tolist() for n in (12, 7, 20)]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]
    assert max(float(z.abs().max()) for z in logits) > 4.5  # the cap bends these logits
    stats = token_statistics(model, sequences, 0, batch_size=2)
    pairs = [(s[:5], s[5:]) for s in sequences]
    candidates = prefixed_logprobs(model, pairs, 0, tokens_per_batch=16)
    for sequence, z, got, scored in zip(sequences, logits, stats, candidates):
        logp = z[:-1].double().log_softmax(-1)
        own = logp.gather(1, torch.tensor(sequence[1:])[:, None]).squeeze(1).numpy()
        assert np.allclose(got["logprobs"], own, atol=1e-4) and np.allclose(scored, own[4:], atol=1e-4)
        p = logp.exp()
        mean = (p * logp).sum(-1)
        assert np.allclose(got["mu"], mean.numpy(), atol=1e-4)
        assert np.allclose(got["sigma"], ((p * (logp - mean[:, None]) ** 2).sum(-1)).sqrt().numpy(), atol=1e-3)

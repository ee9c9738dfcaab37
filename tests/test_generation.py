"""The batched generation engine and the text helpers of synthesize and structure."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from knowledgesg.chunking import chunk_text
from knowledgesg.generation import Completion, Generator, SamplingParams, chat_prompt_ids, length_batches
from knowledgesg.models import load_causal_lm, resolve_model
from knowledgesg.prompts import parse_label
from pipelines.structure import grounding, parse_pair
from pipelines.synthesize import class_quotas, dp_label_histogram, near_duplicates


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm(resolve_model("tiny-random-llama"))


def test_length_batches_cover_every_prompt_once():
    batches = length_batches([5, 1, 9, 3, 9, 2], batch_size=4)
    assert batches == [[2, 4, 0, 3], [5, 1]]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [chat_prompt_ids(tokenizer, text) for text in ["hi", "what is the sentiment of profits rose?", "a much longer prompt about quarterly revenue and margins", "ok"]]
    greedy = SamplingParams(do_sample=False, max_new_tokens=12)
    batched = Generator(model, tokenizer, batch_size=4).generate(prompts, greedy, seed=0)
    alone = [Generator(model, tokenizer, batch_size=1).generate([p], greedy, seed=0)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.new_tokens <= 12 for c in batched)


def test_greedy_equals_transformers_generate(tiny):
    model, tokenizer = tiny
    engine = Generator(model, tokenizer, batch_size=3)
    prompts = [chat_prompt_ids(tokenizer, text) for text in ["hello there", "quarterly revenue rose", "x"]]
    ours = engine.generate(prompts, SamplingParams(do_sample=False, max_new_tokens=10, repetition_penalty=1.3), seed=0)
    for ids, completion in zip(prompts, ours):
        with torch.no_grad():
            reference = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10,
                                       do_sample=False, repetition_penalty=1.3, eos_token_id=engine.stop_ids, pad_token_id=tokenizer.pad_token_id)
        new = [t for t in reference[0, len(ids):].tolist() if t not in engine.stop_ids]
        assert completion.text == tokenizer.decode(new, skip_special_tokens=True)


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    history = torch.zeros((1, 1), dtype=torch.long)
    draws = lambda params: {int(Generator._choose(logits, history, params, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws(SamplingParams(top_k=2, top_p=1.0, temperature=5.0)) == {0, 1}
    assert draws(SamplingParams(top_k=0, top_p=0.5, temperature=1.0)) == {0}  # 0.73 of the mass is token 0 alone
    assert draws(SamplingParams(top_k=0, top_p=1.0, temperature=50.0)) == {0, 1, 2, 3}


def test_sampling_draws_each_token_with_its_probability():
    # 20,000 rows in one call: the inverse-CDF sampler against the softmax it samples from
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, -30.0]]).repeat(20_000, 1)
    history = torch.zeros((20_000, 1), dtype=torch.long)
    draws = Generator._choose(logits, history, SamplingParams(top_k=0, top_p=1.0, temperature=1.0), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5).float() / 20_000
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.01)  # 4 standard errors at p = 0.5 is 0.014
    assert frequencies[4] == 0


def test_rows_leave_at_their_own_budgets(tiny):
    model, tokenizer = tiny
    prompts = [chat_prompt_ids(tokenizer, text) for text in ["hello there", "quarterly revenue rose", "x"]]
    greedy = SamplingParams(do_sample=False, max_new_tokens=9)
    mixed = Generator(model, tokenizer, batch_size=3).generate(prompts, greedy, seed=0, budgets=[2, 9, 5])
    for prompt, budget, completion in zip(prompts, [2, 9, 5], mixed):  # as if each had been asked alone under its budget
        [alone] = Generator(model, tokenizer).generate([prompt], greedy.model_copy(update={"max_new_tokens": budget}), seed=0)
        assert completion == alone and completion.new_tokens <= budget
    with pytest.raises(ValueError):
        Generator(model, tokenizer).generate(prompts, greedy, seed=0, budgets=[2, 10, 5])


def test_generation_stops_at_end_of_turn(tiny):
    model, tokenizer = tiny
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make end-of-turn overwhelmingly likely: the output must stop at once
        model.lm_head.bias = None
        saved = model.lm_head.weight[end].clone()
        model.lm_head.weight[end] = 50.0
        try:
            [completion] = Generator(model, tokenizer).generate([chat_prompt_ids(tokenizer, "hello")], SamplingParams(do_sample=False, max_new_tokens=20), seed=0)
        finally:
            model.lm_head.weight[end] = saved
    assert completion == Completion(text="", new_tokens=1, finished=True)


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    prompts = [chat_prompt_ids(tokenizer, "write a headline")] * 3
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    a = Generator(model, tokenizer).generate(prompts, params, seed=1)
    b = Generator(model, tokenizer).generate(prompts, params, seed=1)
    c = Generator(model, tokenizer).generate(prompts, params, seed=2)
    assert a == b and a != c


def test_chunks_have_bounded_length_exact_overlap_and_cover_the_text(tiny):
    _, tokenizer = tiny
    text = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(tokenizer, "doc/1", text, chunk_tokens=100, overlap_tokens=20)
    assert len(chunks) > 3
    assert all(c.end_token - c.start_token <= 100 for c in chunks)
    for before, after in zip(chunks, chunks[1:]):
        assert before.start_token < after.start_token <= before.end_token - 20  # overlap of at least 20
    assert chunks[0].start_token == 0 and chunks[-1].end_token == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    whole_words = set(text.split())
    assert all(set(c.text.split()) <= whole_words for c in chunks)  # no word cut in two
    assert [c.index for c in chunks] == list(range(len(chunks)))
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text(tokenizer, "doc/1", text, chunk_tokens=10, overlap_tokens=10)


def test_a_short_text_is_one_chunk(tiny):
    _, tokenizer = tiny
    [chunk] = chunk_text(tokenizer, "doc/2", "  Short abstract.  ", chunk_tokens=100, overlap_tokens=10)
    assert chunk.text == "Short abstract."


@pytest.mark.parametrize("completion,expected", [
    (" What does metformin treat?\nAnswer: Type 2 diabetes in adults.", ("What does metformin treat?", "Type 2 diabetes in adults.")),
    (" What is A1C used for?\nAnswer: It measures blood sugar.\nQuestion: another one?", ("What is A1C used for?", "It measures blood sugar.")),
    (" no answer marker here at all", None),
    (" What links HDL and heart disease?\n\nAnswer:\n\nQuestion: What links HDL and heart disease?", None),  # empty answer
    (" Why?\nAnswer: yes", None),  # too short to be a question and an answer
    ("", None),
])
def test_parse_pair(completion, expected):
    assert parse_pair(completion) == expected


def test_grounding_is_the_share_of_answer_words_in_the_chunk():
    chunk = "Metformin lowers blood glucose in patients with type 2 diabetes."
    assert grounding("Metformin lowers glucose", chunk) == 1.0
    assert grounding("Insulin pumps deliver insulin", chunk) == 0.0
    assert grounding("", chunk) == 0.0


def test_near_duplicates_drop_small_edits_and_keep_distinct_texts():
    texts = [
        "The company reported a sharp rise in quarterly operating profit driven by strong demand in Europe",
        "The company reported a sharp rise in quarterly operating profit driven by strong demand in Asia",
        "Shares of the bank fell after it cut its full year outlook on weaker lending",
    ]
    assert near_duplicates(texts, threshold=0.7, seed=1) == {1}


def test_parse_label_takes_the_first_label_named():
    labels = ["negative", "neutral", "positive"]
    assert parse_label("Positive. It is not negative.", labels) == "positive"
    assert parse_label("The answer is neutral", labels) == "neutral"
    assert parse_label("nonpositive", labels) is None


def test_class_quotas_follow_weights_and_sum_to_total():
    assert class_quotas(10, ["a", "b", "c"], [1, 1, 1]) == {"a": 4, "b": 3, "c": 3}
    assert class_quotas(10, ["a", "b"], [3.0, -2.0]) == {"a": 10, "b": 0}  # a negative noisy count is zero
    assert class_quotas(6, ["a", "b"], [-1.0, -1.0]) == {"a": 3, "b": 3}  # nothing left: uniform


def test_dp_label_histogram_noise_has_the_stated_scale():
    from knowledgesg.records import InstructionRecord
    from privacy.noise import SecureRandom
    from privacy.units import privacy_units

    # a heavy user with 10 neutral records, of which the bound keeps 2, and 15 users of 2 records
    heavy = [InstructionRecord(id=f"h/{i}", instruction="Q", response="neutral", source="s", user_id="heavy") for i in range(10)]
    records = heavy + [InstructionRecord(id=f"s/{i}", instruction="Q", response=l, source="s", user_id=f"u{i // 2}") for i, l in enumerate(["neutral"] * 20 + ["positive"] * 10)]
    units = privacy_units(records, "user", max_records=2, documents=False)  # sensitivity 2
    # a fixed public seed: the distribution check gives the same answer every run (OS entropy would fail some runs)
    random = SecureRandom.from_public_seed("test", "dp_label_histogram")
    draws = [dp_label_histogram(records, ["negative", "neutral", "positive"], units, 4.0, random) for _ in range(2000)]
    neutral = torch.tensor([d["neutral"] for d in draws], dtype=torch.float64)
    assert float(neutral.mean()) == pytest.approx(2 + 20, abs=0.6)  # the heavy user's 2 kept records, not its 10 (30 in all)
    assert float(neutral.std()) == pytest.approx(8.0, rel=0.05)
    assert Counter(round(d["negative"]) > 0 for d in draws)[True] > 700  # zero counts get noise too


def test_repeated_prompts_share_one_prefill_and_sample_as_before(tiny, monkeypatch):
    """Samples of one prompt prefill it once (the cache is copied to each sample's row), and give
    exactly the samples of the plain engine that prefills every row."""
    model, tokenizer = tiny
    a, b = chat_prompt_ids(tokenizer, "write a headline"), chat_prompt_ids(tokenizer, "a much longer prompt about quarterly revenue")
    prompts = [a, b, a, a, b, a]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    rows_prefilled = []
    forward = model.forward

    def counting(*args, **kwargs):
        rows_prefilled.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    shared = Generator(model, tokenizer, batch_size=6).generate(prompts, params, seed=3)
    assert rows_prefilled[0][0] == 2 and rows_prefilled[1][0] == 6  # 2 distinct prompts prefilled, then 6 rows decode
    real_unique = torch.unique

    def no_sharing(x, **kwargs):  # every row its own "unique" prompt: the plain engine
        return (x, torch.arange(x.shape[0])) if kwargs.get("dim") == 0 else real_unique(x, **kwargs)

    monkeypatch.setattr(torch, "unique", no_sharing)
    plain = Generator(model, tokenizer, batch_size=6).generate(prompts, params, seed=3)
    assert [c.text for c in shared] == [c.text for c in plain]
    assert len({c.text for c in shared}) > 2  # the samples of one prompt differ: the sampling is per row


def test_prompts_that_begin_alike_run_their_prefix_once_and_generate_as_before(tiny, monkeypatch):
    """A batch's common prefix (chat template, instruction) runs once as one row; each row's own
    tokens follow it after their left padding. Greedy and seeded sampling, with the repetition
    penalty reading the prefix too, give what the engine gives without sharing; repeated prompts
    still prefill once."""
    from knowledgesg import generation

    model, tokenizer = tiny
    head = "Instruction: what is the sentiment of this news for the company's shareholders? Answer with one word.\nInput: "
    prompts = [chat_prompt_ids(tokenizer, head + text) for text in ["profits rose", "the bank cut its dividend after a weak quarter", "ok", "profits rose"]]
    shared = generation.shared_prefix_length(prompts)
    assert shared >= generation.SHARED_PREFIX_MIN
    shapes = []
    forward = model.forward

    def counting(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    runs = {}
    for name, minimum in (("shared", generation.SHARED_PREFIX_MIN), ("plain", 10**9)):
        monkeypatch.setattr(generation, "SHARED_PREFIX_MIN", minimum)
        shapes.clear()
        runs[name] = [Generator(model, tokenizer, batch_size=4).generate(prompts, params, seed=5)
                      for params in (SamplingParams(do_sample=False, max_new_tokens=10, repetition_penalty=1.3), SamplingParams(max_new_tokens=10, temperature=1.0))]
        runs[name + " shapes"] = list(shapes)
    assert runs["shared shapes"][0] == (1, shared)  # the prefix, once
    assert runs["shared shapes"][1][0] == 3  # then the 3 distinct prompts' own tokens
    assert runs["plain shapes"][0][0] == 3 and runs["plain shapes"][0][1] > shared
    for shared_run, plain_run in zip(runs["shared"], runs["plain"]):
        assert [c.text for c in shared_run] == [c.text for c in plain_run]
        assert [c.new_tokens for c in shared_run] == [c.new_tokens for c in plain_run]


def test_the_nucleus_found_among_the_top_tokens_is_the_one_a_full_sort_finds():
    """Rows from flat to peaked, so that at a small `first_k` some nuclei reach past the top
    tokens (those rows rank their whole vocabulary) and some do not."""
    from knowledgesg.generation import nucleus

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 500, generator=generator) * torch.logspace(-1, 1.2, 40)[:, None]

    def by_sort(top_p):  # the definition, in float64: sort everything, keep while the tokens above hold at most top_p
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.double().softmax(dim=-1)
        keep = probs.cumsum(dim=-1) - probs <= top_p
        return torch.zeros_like(keep).scatter(1, order, keep)

    for top_p in (0.5, 0.9, 0.95):
        expected = by_sort(top_p)
        sizes = expected.sum(dim=-1)
        assert (sizes > 8).any() and (sizes < 8).any() and sizes.min() >= 1
        for first_k in (1, 8, 64, 500):
            assert torch.equal(nucleus(logits, top_p, first_k), expected), (top_p, first_k)


def test_the_output_head_multiplies_one_matrix_in_batched_passes(tiny, monkeypatch):
    """A batched pass keeps the logits of its last columns only. Sliced as `[:, -n:]`, those columns
    do not fold into one matrix across rows, and torch's matmul with a head that needs no gradient
    multiplies each row by its own copy of the head (272x slower for 55 rows of SmolLM2 in bfloat16:
    head_column.md). Every head input of several rows must fold (torch's rule: stride(0) == stride(1) x
    size(1)): in generation, prefixed scoring's prefix pass, last_logprobs, and the scoring of a
    model whose head cannot be taken a slice at a time."""
    from knowledgesg import scoring

    model, tokenizer = tiny
    seen: list[tuple[str, torch.Tensor]] = []
    section = ""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append((section, args[0])))
    texts = ["profits rose sharply this quarter", "margins fell", "guidance unchanged for the year"]
    try:
        section = "generation"
        Generator(model, tokenizer, batch_size=3).generate([chat_prompt_ids(tokenizer, t) for t in texts], SamplingParams(do_sample=False, max_new_tokens=3), seed=0)
        section = "prefixed_logprobs"
        prefixes = [tokenizer(t)["input_ids"] for t in ["The code of the vault is", "Our client lives at the address"]]
        scoring.prefixed_logprobs(model, [(p, tokenizer(" 1234", add_special_tokens=False)["input_ids"]) for p in prefixes], tokenizer.pad_token_id)
        section = "last_logprobs"
        scoring.last_logprobs(model, [tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id, "cpu")
        section = "unsliced head"
        monkeypatch.setattr(scoring, "_factored_head", lambda model: None)
        scoring.continuation_logprobs(model, [tokenizer(t)["input_ids"] for t in texts], [tokenizer(" ok", add_special_tokens=False)["input_ids"]] * 3, tokenizer.pad_token_id)
    finally:
        hook.remove()
    batched = [(name, x) for name, x in seen if x.shape[0] > 1]
    assert {name for name, _ in batched} == {"generation", "prefixed_logprobs", "last_logprobs", "unsliced head"}
    unfolded = [(name, tuple(x.shape), x.stride()) for name, x in batched if x.stride(0) != x.stride(1) * x.shape[1]]
    assert not unfolded

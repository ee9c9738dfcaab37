"""DP-SGD mechanism on the tiny model: clipping, noise, units, virtual steps, empty batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from knowledgesg.errors import KsgError
from knowledgesg.models import load_causal_lm, resolve_model
from knowledgesg.records import InstructionRecord
from knowledgesg.sft import collate, per_sequence_loss, sequence_losses, tokenize_example, unit_loss_on, unit_widths
from privacy.dp_sgd import DPSGD, DPSGDSettings, micro_batches, poisson_batches, unit_means
from privacy.noise import SecureRandom

TEXTS = ["Profits rose sharply .", "Sales fell", "The company announced a new plant in Oulu .", "Shares were flat", "Net loss widened to EUR 2 mn ."]
LABELS = ["positive", "negative", "neutral", "neutral", "negative"]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_causal_lm(resolve_model("tiny-random-llama"))
    torch.manual_seed(0)  # before peft draws A: the fixture must not depend on the tests that ran before it
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would zero every gradient of A
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    records = [InstructionRecord(id=f"s/{i}", instruction="Sentiment?", input=t, response=l, source="s") for i, (t, l) in enumerate(zip(TEXTS, LABELS))]
    examples = [tokenize_example(tokenizer, r, 64) for r in records]
    return model, tokenizer, examples


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in _trainable(model)])


# what dp_train differentiates (logits on labelled positions only, through Opacus's hooks); the
# references below compute the full logits on a plain model
unit_loss = unit_loss_on("cpu")


def _dp_update(setup, units, settings, max_rows=64, seed=0):
    """Parameter change of one DP-SGD step (SGD, lr 1) over the given units."""
    model, tokenizer, examples = setup
    model = copy.deepcopy(model)
    before = _flat(model)
    dp = DPSGD(model, lambda ps: torch.optim.SGD(ps, lr=1.0), settings, SecureRandom.from_public_seed("test", seed))
    rows_per_unit = [len(u) for u in units]

    def physical(batch):
        rows = [r for u in batch for r in units[u]]
        row_unit = torch.tensor([i for i, u in enumerate(batch) for _ in units[u]])
        return collate([examples[r] for r in rows], tokenizer.pad_token_id), row_unit, len(batch)

    widths = unit_widths(examples, units) if units else []
    batches = [physical(b) for b in micro_batches(list(range(len(units))), rows_per_unit, widths, max_rows)] if units else []
    dp.step(batches, unit_loss)
    return _flat(dp.module._module) - before, dp


def _reference_unit_grads(setup, units):
    """Each unit's gradient, computed alone on a plain copy of the model (no Opacus)."""
    model, tokenizer, examples = setup
    grads = []
    for unit in units:
        plain = copy.deepcopy(model)
        batch = collate([examples[r] for r in unit], tokenizer.pad_token_id)
        per_sequence_loss(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in _trainable(plain)]))
    return grads


def _clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * min(1.0, c / (float(g.norm()) + 1e-6))


@pytest.mark.parametrize("units", [[[0], [1], [2], [3], [4]], [[0, 1], [2], [3, 4]]], ids=["record-level", "user-level"])
def test_clipped_unit_gradients_match_one_at_a_time_reference(setup, units):
    clip, expected_batch = 0.05, 4
    reference = _reference_unit_grads(setup, units)
    assert min(float(g.norm()) for g in reference) > clip, "clipping must be active for this test to mean anything"
    expected = -sum(_clip(g, clip) for g in reference) / expected_batch
    update, _ = _dp_update(setup, units, DPSGDSettings(noise_multiplier=0.0, clip_norm=clip, sample_rate=0.5, expected_batch_units=expected_batch))
    assert torch.allclose(update, expected, atol=1e-6, rtol=1e-4)
    assert float(update.norm()) <= clip * len(units) / expected_batch + 1e-6  # each unit contributes at most C


def test_virtual_steps_equal_one_physical_batch(setup):
    units = [[0], [1, 2], [3], [4]]
    settings = DPSGDSettings(noise_multiplier=0.0, clip_norm=0.05, sample_rate=0.5, expected_batch_units=4)
    whole, _ = _dp_update(setup, units, settings, max_rows=64)
    split, dp = _dp_update(setup, units, settings, max_rows=1)
    assert torch.allclose(whole, split, atol=1e-7)
    assert dp.accounted_history() == [(0.0, 0.5, 1)]  # four physical passes, one accounted step


def test_noise_has_the_right_scale_on_an_empty_batch(setup):
    sigma, clip, batch = 2.0, 0.5, 4
    update, dp = _dp_update(setup, [], DPSGDSettings(noise_multiplier=sigma, clip_norm=clip, sample_rate=0.1, expected_batch_units=batch))
    assert dp.empty_steps == 1 and dp.accounted_history() == [(sigma, 0.1, 1)]
    expected_std = sigma * clip / batch
    assert update.numel() > 1000  # std of the std estimate: 1/sqrt(2n) = 2% here
    assert float(update.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(update.mean())) < 4 * expected_std / math.sqrt(update.numel())


def test_the_noise_follows_its_secure_key_not_torchs_generator(setup):
    """dp_train seeds torch's generator from the public seed (dropout, LoRA's A), so noise drawn
    from it (Opacus's own `add_noise`) could be replayed by anyone holding the spec. The noise
    must change with the SecureRandom's key and with nothing else."""
    settings = DPSGDSettings(noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.1, expected_batch_units=4)
    torch.manual_seed(0)
    first, _ = _dp_update(setup, [], settings, seed=1)
    torch.manual_seed(0)
    other_key, _ = _dp_update(setup, [], settings, seed=2)
    torch.manual_seed(1)
    other_torch_seed, _ = _dp_update(setup, [], settings, seed=1)
    assert not torch.allclose(first, other_key)
    assert torch.equal(first, other_torch_seed)


def test_infinity_path_adds_no_noise_and_does_not_clip(setup):
    units = [[0], [1], [2]]
    settings = DPSGDSettings(noise_multiplier=0.0, clip_norm=math.inf, sample_rate=0.5, expected_batch_units=3)
    first, dp = _dp_update(setup, units, settings, seed=1)
    second, _ = _dp_update(setup, units, settings, seed=2)
    assert torch.equal(first, second) and not dp.private
    expected = -sum(_reference_unit_grads(setup, units)) / 3
    assert torch.allclose(first, expected, atol=1e-6, rtol=1e-4)


def test_empty_poisson_batches_happen():
    """Poisson sampling keeps its empty steps (the accountant's q assumes them). A fixed key: the
    test is about the distribution, and must not fail one run in a thousand."""
    batches = list(poisson_batches(20, 0.02, 200, SecureRandom.from_public_seed("test", "poisson")))
    sizes = [len(b) for b in batches]
    assert len(batches) == 200
    assert sizes.count(0) > 100  # (1 - 0.02)^20 = 0.67 of the steps are empty
    assert sum(sizes) / len(sizes) == pytest.approx(20 * 0.02, rel=0.35)


def test_micro_batches_never_split_a_unit():
    rows = [3, 1, 4, 2]
    batches = micro_batches([0, 1, 2, 3], rows, [50, 50, 50, 50], max_rows=4)
    assert sorted(u for b in batches for u in b) == [0, 1, 2, 3]
    assert all(sum(rows[u] for u in b) <= 4 or len(b) == 1 for b in batches)


def test_micro_batches_group_by_length_when_padding_costs_more_than_a_pass():
    # one long unit beside seven short ones: padding the short ones to 128 costs 7 x 68 tokens,
    # more than a second forward pass (64)
    widths = [128] + [60] * 7
    assert micro_batches(list(range(8)), [1] * 8, widths, max_rows=8, pass_overhead_tokens=64) == [[0], [1, 2, 3, 4, 5, 6, 7]]
    # similar lengths stay in one pass
    assert micro_batches(list(range(8)), [1] * 8, [64, 60, 60, 60, 58, 60, 60, 62], max_rows=8) == [[0, 7, 1, 2, 3, 5, 6, 4]]


def test_loss_on_labelled_positions_equals_the_full_logits_loss(setup):
    """The vocabulary projection is applied to labelled positions only; the losses are unchanged."""
    model, tokenizer, examples = setup
    plain = copy.deepcopy(model).eval()
    records = [InstructionRecord(id=f"a/{i}", instruction="Say it", input=t, response=l, source="s") for i, (t, l) in enumerate(zip(TEXTS, LABELS))]
    for loss_on in ("response", "all"):
        batch = collate([tokenize_example(tokenizer, r, 64, loss_on) for r in records], tokenizer.pad_token_id)
        with torch.no_grad():
            full = per_sequence_loss(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
            gathered = sequence_losses(plain, batch, "cpu")
        assert (batch["attention_mask"] == 0).any()  # padding is there to be skipped
        assert torch.allclose(gathered, full, atol=1e-5, rtol=1e-5), (loss_on, gathered, full)


def _tiny_gemma3(softcapping: float | None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=8, final_logit_softcapping=softcapping)
    model = get_peft_model(Gemma3ForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, parameter in model.named_parameters():  # B away from zero, so that the adapter has a gradient to compare
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_batch_loss_on_labelled_positions_equals_the_models_own_loss_and_gradient(setup, family):
    """tune_professional's loss (public data: the batch's token mean) with the head on labelled
    positions only: the model's built-in loss and the adapter's gradient, unchanged. Gemma 3's
    262k-token head made the full logits cost more than the rest of the model."""
    from knowledgesg.sft import batch_token_loss, decoder_and_head

    if family == "llama":
        model = copy.deepcopy(setup[0])
        batch = collate(setup[2][:4], setup[1].pad_token_id)
    else:
        model = _tiny_gemma3(None)
        ids = [[2, 17, 41, 99, 5, 8, 250], [2, 31, 7, 12], [2, 60, 61, 62, 63, 64]]
        batch = {"input_ids": torch.tensor([r + [0] * (7 - len(r)) for r in ids]), "attention_mask": torch.tensor([[1] * len(r) + [0] * (7 - len(r)) for r in ids]),
                 "labels": torch.tensor([[-100] * (len(r) - 2) + r[-2:] + [-100] * (7 - len(r)) for r in ids])}
        assert decoder_and_head(_tiny_gemma3(30.0)) is None  # soft-capped logits: the head is not split off
    assert decoder_and_head(model) is not None
    model.train()
    trained = [t for t in model.parameters() if t.requires_grad]

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in trained]

    own, own_grads = loss_and_grads(lambda: model(**batch).loss)
    gathered, gathered_grads = loss_and_grads(lambda: batch_token_loss(model, batch, "cpu"))
    assert torch.allclose(gathered, own, atol=1e-5, rtol=1e-5), (gathered, own)
    assert any(g.abs().max() > 0 for g in own_grads)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gathered_grads, own_grads))

def test_length_grouped_micro_batches_leave_the_dp_update_unchanged(setup):
    """Same units, one physical batch against length-grouped ones of at most 2 rows: the same
    clipped sum (no noise), so the same update to float tolerance."""
    units = [[0], [1, 3], [2], [4]]
    settings = DPSGDSettings(noise_multiplier=0.0, clip_norm=0.05, sample_rate=0.5, expected_batch_units=4)
    whole, _ = _dp_update(setup, units, settings, max_rows=64)
    grouped, _ = _dp_update(setup, units, settings, max_rows=2)
    assert whole.abs().max() > 0
    assert torch.allclose(whole, grouped, atol=1e-7, rtol=1e-5)


def test_per_sequence_loss_does_not_depend_on_batchmates(setup):
    """The trap: the model's built-in loss averages over all tokens of the batch."""
    model, tokenizer, examples = setup
    short, long_ = examples[1], examples[2]
    assert len(long_.input_ids) > len(short.input_ids)
    plain = copy.deepcopy(model).eval()

    def loss_of_first(batch_examples, builtin: bool) -> float:
        batch = collate(batch_examples, tokenizer.pad_token_id)
        out = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"] if builtin else None)
        return float(out.loss) if builtin else float(per_sequence_loss(out.logits, batch["labels"])[0])

    with torch.no_grad():
        assert loss_of_first([short], False) == pytest.approx(loss_of_first([short, long_], False), rel=1e-5)
        # the built-in loss for the same first example changes with its batchmate (beyond the tolerance the
        # per-sequence loss meets above; on a random tiny model every token's loss is near log(vocabulary), so by little)
        assert loss_of_first([short, long_], True) != pytest.approx(loss_of_first([short, short], True), rel=1e-5)


def test_the_no_update_check_fires_when_weights_did_not_move(setup):
    from knowledgesg.errors import KsgError
    from pipelines.dp_train import DPTrain

    model = setup[0]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(KsgError, match="LoRA weights did not change after the first DP-SGD step"):
        DPTrain._check_adapter_moved(model, frozen)


def test_unit_means():
    per_row = torch.tensor([1.0, 3.0, 5.0, 2.0])
    assert unit_means(per_row, torch.tensor([0, 0, 1, 2]), 3).tolist() == [2.0, 5.0, 2.0]


def _box_muller(u: torch.Tensor, n: int, std: float) -> torch.Tensor:
    """The plain construction: 4n uniforms, four Box-Muller draws per value, summed and halved."""
    radius, angle = torch.sqrt(-2.0 * torch.log(u[: 2 * n])), 2.0 * math.pi * u[2 * n :]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)]).view(4, n).sum(0) * (std / 2)


def test_secure_gaussian_is_box_muller_over_the_keystream_uniforms_and_normal():
    """The fast in-place sampler gives exactly the values of the plain construction over
    `uniform`'s doubles, and they are normal with the asked-for scale. The uniforms are
    (m + 1/2) 2^-52 for 52 random bits m. The keystream runs on across draws into the reused
    buffer: a second draw is the plain construction over the next uniforms."""
    from scipy import stats

    key, n, std = b"k" * 32, 20_000, 0.7
    one = SecureRandom(key, "reproducible")
    got, second = one.normal((n,), std, dtype=torch.float64), one.normal((n,), std, dtype=torch.float64)
    u = torch.from_numpy(SecureRandom(key, "reproducible").uniform(8 * n))
    assert torch.allclose(got, _box_muller(u[: 4 * n], n, std), atol=1e-12, rtol=0)
    assert torch.allclose(second, _box_muller(u[4 * n :], n, std), atol=1e-12, rtol=0)
    assert stats.kstest(got.numpy() / std, "norm").pvalue > 1e-3
    assert float(got.std()) == pytest.approx(std, rel=0.03)
    steps = u.numpy() * 2.0**52 - 0.5
    assert (steps == steps.round()).all() and steps.min() >= 0 and steps.max() < 2.0**52 and len(set(steps.tolist())) == 8 * n


def test_a_draw_longer_than_one_pass_is_the_same_construction_pass_by_pass():
    """Large draws (DP-SGD's noise for every parameter at once) run the sampler in passes of
    `_CHUNK` values: each pass is the construction over the next uniforms."""
    from privacy.noise import _CHUNK

    key, n, std = b"c" * 32, _CHUNK + 1000, 1.3
    got = SecureRandom(key, "reproducible").normal((n,), std, dtype=torch.float64)
    u = torch.from_numpy(SecureRandom(key, "reproducible").uniform(4 * n))
    expected = torch.cat([_box_muller(u[: 4 * _CHUNK], _CHUNK, std), _box_muller(u[4 * _CHUNK :], n - _CHUNK, std)])
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert float(got.std()) == pytest.approx(std, rel=0.01)


def _bfloat16_base(setup):
    """The fixture's model with its frozen weights in bfloat16 (the adapter stays float32)."""
    model = copy.deepcopy(setup[0])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return (model, *setup[1:])


def test_bfloat16_base_weights_still_clip_each_unit_exactly(setup):
    """A bfloat16 base passes bfloat16 hidden states, but each unit's gradient is clipped in
    float32: one unit at a time, the update's norm is C to float32 precision (with a bfloat16
    adapter it came out up to 0.9% off)."""
    low = _bfloat16_base(setup)
    assert {p.dtype for p in low[0].parameters() if p.requires_grad} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in low[0].parameters() if not p.requires_grad)
    clip = 0.05
    settings = DPSGDSettings(noise_multiplier=0.0, clip_norm=clip, sample_rate=0.5, expected_batch_units=1)
    for unit in range(len(TEXTS)):
        low_update, _ = _dp_update(low, [[unit]], settings)
        assert float(low_update.norm()) == pytest.approx(clip, rel=2e-5)
        # and it points where the float32 model's does: bfloat16 changes the gradient a little
        full_update, _ = _dp_update(setup, [[unit]], settings)
        assert float(torch.nn.functional.cosine_similarity(low_update, full_update, dim=0)) > 0.98


def test_dp_sgd_refuses_parameters_below_float32(setup):
    low = copy.deepcopy(setup[0]).to(torch.bfloat16)
    with pytest.raises(KsgError, match="float32 parameters only"):
        DPSGD(low, lambda ps: torch.optim.SGD(ps, lr=1.0), DPSGDSettings(1.0, 1.0, 0.5, 1), SecureRandom.from_public_seed("test", 0))


def test_a_dp_trained_linear_layer_gets_per_unit_gradients_and_no_summed_one(setup):
    """autograd's summed gradient of a weight DP-SGD trains is never read (the update is the
    clipped sum of per-unit gradients), so it is not computed; once closed, the layers are
    ordinary linear layers again and backward gives the summed gradient."""
    model, tokenizer, examples = setup
    model = copy.deepcopy(model)
    dp = DPSGD(model, lambda ps: torch.optim.SGD(ps, lr=1.0), DPSGDSettings(0.0, 1.0, 0.5, 2), SecureRandom.from_public_seed("test", 0))
    batch = collate(examples[:2], tokenizer.pad_token_id)
    unit_loss(dp.module, batch, torch.arange(2), 2).sum().backward()
    lora = [p for n, p in dp.module.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is None and p.grad_sample.shape == (2, *p.shape) for p in lora)
    summed = torch.cat([p.grad_sample.sum(0).flatten() for p in lora])
    dp.optimizer.zero_grad(set_to_none=True)
    dp.close()
    unit_loss(model, batch, torch.arange(2), 2).sum().backward()
    assert torch.allclose(torch.cat([p.grad.flatten() for p in lora]), summed, atol=1e-6, rtol=1e-4)
    dp.close()  # a second close changes nothing
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_refused_dp_sgd_leaves_the_model_as_it_was(setup):
    """A refusal (here a bfloat16 adapter) must not leave layers that give no summed gradient: the
    same model object may then be trained another way."""
    model = copy.deepcopy(setup[0]).to(torch.bfloat16)
    with pytest.raises(KsgError, match="float32 parameters only"):
        DPSGD(model, lambda ps: torch.optim.SGD(ps, lr=1.0), DPSGDSettings(0.0, 1.0, 0.5, 2), SecureRandom.from_public_seed("test", 0))
    assert not any("forward" in vars(m) for m in model.modules())

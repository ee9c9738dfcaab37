"""Log-likelihood scoring with a causal LM: the judge in `refine` and the benchmarks in `eval`.

A choice is scored by the summed log-probability of its tokens after the context (as
lm-evaluation-harness does): context and continuation are tokenized separately, so a choice's
tokens are the same after every context. Rows are grouped by length to waste little padding.
"""

from __future__ import annotations

import copy

import numpy as np

from knowledgesg.console import track
from knowledgesg.generation import SHARED_PREFIX_MIN, after_prefix, last_columns, length_batches, pad_batch, run_prefix, shared_prefix_length


def encode_context(tokenizer, text: str) -> list[int]:
    """With the tokenizer's special tokens (Gemma's BOS: its base model degrades without it)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_continuation(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _batches(lengths: list[int], batch_size: int, progress: str | None) -> list[list[int]]:
    """Length-grouped batches, under a progress bar when `progress` names the step."""
    batches = length_batches(lengths, batch_size)
    return list(track(batches, progress, total=len(batches))) if progress and len(batches) > 1 else batches


def continuation_logprobs(model, contexts: list[list[int]], continuations: list[list[int]], pad_id: int, batch_size: int = 8, device: str = "cpu",
                          progress: str | None = None) -> list[np.ndarray]:
    """Per-token log-probabilities of each continuation given its context.

    Rows are left-padded so that every continuation ends in the last column; the model then
    computes logits for the last positions only (`logits_to_keep`). With Gemma's 262k-token
    vocabulary, logits for every position of a few-shot prompt cost far more than the model.
    """
    import torch

    if len(contexts) != len(continuations):
        raise ValueError("one continuation per context")
    if any(not c for c in continuations):
        raise ValueError("an empty continuation has no log-probability")
    results: list[np.ndarray | None] = [None] * len(contexts)
    # one-token continuations after the same context (a label, a Yes/No, an option letter) are
    # all read from one forward pass of that context
    shared: dict[tuple[int, ...], list[int]] = {}
    for i, continuation in enumerate(continuations):
        if len(continuation) == 1:
            shared.setdefault(tuple(contexts[i]), []).append(i)
    owners = list(shared.values())
    for rows, logprobs in zip(owners, next_token_logprobs(model, [contexts[rows[0]] for rows in owners], [[continuations[i][0] for i in rows] for rows in owners], pad_id, batch_size, device, progress)):
        for i, value in zip(rows, logprobs):
            results[i] = np.array([value], dtype=np.float32)
    rest = [i for i, continuation in enumerate(continuations) if len(continuation) > 1]
    sequences = {i: contexts[i] + continuations[i] for i in rest}
    # every row keeps at least one context token of its own: it predicts the continuation's first token
    shared = shared_prefix_length([contexts[i] for i in rest]) if rest else 0
    model.eval()
    with torch.no_grad():
        prefix = run_prefix(model, contexts[rest[0]][:shared], device) if shared else None
        for chunk in _batches([len(sequences[i]) for i in rest], batch_size, progress):
            batch = [rest[k] for k in chunk]
            keep = max(len(continuations[i]) for i in batch) + 1
            ids, inputs = _left_padded([sequences[i][shared:] for i in batch], pad_id, device, prefix, shared)
            # [rows, keep]: the log-probabilities of the tokens the last `keep` positions predict
            _, _, chosen = _next_token_statistics(model, _next_ids(ids[:, -keep:]), False, keep, **inputs)
            for row, i in enumerate(batch):
                # the token at position t is predicted at t - 1: the continuation's tokens (the last
                # n columns) are predicted by kept columns keep-n-1 .. keep-2
                n = len(continuations[i])
                results[i] = chosen[row, keep - n - 1 : keep - 1].cpu().numpy()
    return results  # type: ignore[return-value]


def prefixed_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, tokens_per_batch: int = 1024, device: str = "cpu") -> list[np.ndarray]:
    """Per-token log-probabilities of each (prefix, continuation) pair's continuation, for many
    prefixes each shared by several pairs (an audit's candidates for each of many PII spans or
    canary secrets; all its canaries after their template's common text).

    Rows of several prefixes share a batch of at most `tokens_per_batch` continuation tokens
    (padding included; a longer row has a batch of its own): the batch's distinct prefixes run
    once, left-padded together, and each row takes its prefix's key-value cache, its continuation
    right-padded after it. Batching per prefix ran ten candidates of thirty tokens as a 300-row
    matmul; on a CPU, where [rows, 576] x [576, 1536] runs faster the more rows it has, fewer and
    fuller batches do the same work sooner.
    """
    import torch
    from transformers import DynamicCache

    if any(not prefix or not continuation for prefix, continuation in pairs):
        raise ValueError("every pair needs a prefix and a continuation")
    keys = [tuple(prefix) for prefix, _ in pairs]
    owners: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(keys):
        owners.setdefault(key, []).append(i)
    # longest continuations first, a prefix's rows together: little padding, few prefixes per batch
    groups = sorted(owners.values(), key=lambda rows: (-max(len(pairs[i][1]) for i in rows), rows[0]))
    order = [i for rows in groups for i in sorted(rows, key=lambda i: -len(pairs[i][1]))]
    results: list[np.ndarray | None] = [None] * len(pairs)
    model.eval()
    with torch.no_grad():
        for batch in _token_budget_batches([len(pairs[i][1]) for i in order], tokens_per_batch):
            rows = [order[k] for k in batch]
            slot_of = {key: k for k, key in enumerate(dict.fromkeys(keys[i] for i in rows))}
            slot = torch.tensor([slot_of[keys[i]] for i in rows])
            prefix_ids, prefix_mask = pad_batch(list(slot_of), pad_id, left=True)
            cache = DynamicCache()
            first = model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device), position_ids=((prefix_mask.cumsum(-1) - 1).clamp(min=0)).to(device),
                          past_key_values=cache, use_cache=True, logits_to_keep=last_columns(prefix_ids.shape[1], device=device)).logits[:, -1].float().log_softmax(-1)
            cache.batch_select_indices(slot.to(device))
            ids, mask = pad_batch([pairs[i][1] for i in rows], pad_id, left=False)
            positions = prefix_mask.sum(-1)[slot][:, None] + torch.arange(ids.shape[1])[None, :]
            # column t predicts the continuation's token t + 1: the last column predicts nothing
            _, _, chosen = _next_token_statistics(model, _next_ids(ids), False, input_ids=ids.to(device), attention_mask=torch.cat([prefix_mask[slot], mask], dim=1).to(device),
                                                  position_ids=positions.to(device), past_key_values=cache, use_cache=True)
            for row, i in enumerate(rows):
                n = len(pairs[i][1])
                results[i] = torch.cat([first[slot[row], ids[row, :1].to(first.device)], chosen[row, : n - 1]]).cpu().numpy()
    return results  # type: ignore[return-value]


def _token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of positions whose rows, each padded to the run's longest, take at most
    `budget` tokens; at least one row each."""
    batches: list[list[int]] = []
    longest = 0
    for k, length in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(longest, length) <= budget:
            batches[-1].append(k)
            longest = max(longest, length)
        else:
            batches.append([k])
            longest = length
    return batches


def _inputs_after_prefix(cache, width: int, ids, mask, device: str) -> dict:
    """The model inputs of padded rows (left or right) that all continue one prefix of `width`
    tokens, whose key-value cache (`cache`, left untouched) is copied to every row. Left padding
    sits between the prefix and a row's own tokens, masked out."""
    rows_cache = copy.deepcopy(cache)
    rows_cache.batch_repeat_interleave(ids.shape[0])
    full_mask, positions = after_prefix(mask, width)
    return {"input_ids": ids.to(device), "attention_mask": full_mask.to(device), "position_ids": positions.to(device), "past_key_values": rows_cache, "use_cache": True}


def next_token_logprobs(model, contexts: list[list[int]], wanted: list[list[int]], pad_id: int, batch_size: int = 8, device: str = "cpu",
                        progress: str | None = None) -> list[np.ndarray]:
    """For each context, the log-probabilities of its `wanted` tokens as the next token. Contexts
    that share a prefix (a chat template and instruction, a judge's or labeller's few-shot
    examples) run it once."""
    import torch

    results: list[np.ndarray | None] = [None] * len(contexts)
    shared = shared_prefix_length(contexts)
    model.eval()
    with torch.no_grad():
        prefix = run_prefix(model, contexts[0][:shared], device) if shared else None
        for batch in _batches([len(c) - shared for c in contexts], batch_size, progress):
            logprobs = last_logprobs(model, [contexts[i][shared:] for i in batch], pad_id, device, prefix, shared)
            for row, i in enumerate(batch):
                results[i] = logprobs[row, torch.tensor(wanted[i], device=logprobs.device)].cpu().numpy()
    return results  # type: ignore[return-value]


def last_logprobs(model, sequences: list[list[int]], pad_id: int, device: str, prefix=None, width: int = 0):
    """Log-softmax over the vocabulary after the last token of each sequence, left-padded into one
    batch so that every sequence ends in the last column: [rows, vocab]. With `prefix` (the cache
    of `run_prefix`), the sequences continue its `width` tokens."""
    _, inputs = _left_padded(sequences, pad_id, device, prefix, width)
    return model(**inputs, logits_to_keep=last_columns(inputs["input_ids"].shape[1], device=device)).logits[:, -1].float().log_softmax(dim=-1)


def _left_padded(sequences: list[list[int]], pad_id: int, device: str, prefix=None, width: int = 0):
    """(the ids, the model inputs) of sequences left-padded into one batch, each ending in the
    last column; with `prefix` (the cache of `run_prefix`), continuing its `width` tokens."""
    ids, mask = pad_batch(sequences, pad_id, left=True)
    if prefix is not None:
        return ids, _inputs_after_prefix(prefix, width, ids, mask, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str], batch_size: int = 8, device: str = "cpu", progress: str | None = None) -> np.ndarray:
    """[len(prompts), len(choices)] summed log-probabilities of each choice after each prompt.

    The choices are written as they follow the prompt, leading space included (" positive").
    """
    contexts = [encode_context(tokenizer, p) for p in prompts]
    return choice_logprobs_of_ids(model, tokenizer, contexts, [encode_continuation(tokenizer, c) for c in choices], batch_size, device, progress)


def choice_logprobs_of_ids(model, tokenizer, contexts: list[list[int]], choices: list[list[int]], batch_size: int = 8, device: str = "cpu",
                           progress: str | None = None) -> np.ndarray:
    """`choice_logprobs` for contexts and choices already tokenized (e.g. through a chat template)."""
    pairs = [(i, j) for i in range(len(contexts)) for j in range(len(choices))]
    scores = continuation_logprobs(model, [contexts[i] for i, _ in pairs], [choices[j] for _, j in pairs], pad_id(tokenizer), batch_size, device, progress)
    table = np.empty((len(contexts), len(choices)))
    for (i, j), token_scores in zip(pairs, scores):
        table[i, j] = float(token_scores.sum())
    return table


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def normalized_choice_probs(table: np.ndarray) -> np.ndarray:
    """Softmax over each row's choices: the model's probabilities restricted to the choices."""
    shifted = table - table.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


def token_statistics(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8, device: str = "cpu", progress: str | None = None,
                     moments: bool = True) -> list[dict[str, np.ndarray]]:
    """For each sequence, per predicted token (positions 1..n-1): its log-probability, and the mean
    and standard deviation of log p under the model's whole next-token distribution (Min-K%++;
    zeros with `moments` False, for a caller that needs the log-probabilities only).

    Records of one data set share their chat template and instruction: sequences that begin with
    the same SHARED_PREFIX_MIN tokens are grouped, and each group's common prefix runs once and its
    statistics serve every row of the group (a record cut from the left stands apart)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, sequence in enumerate(sequences):
        groups.setdefault(tuple(sequence[:SHARED_PREFIX_MIN]), []).append(i)
    results: list[dict | None] = [None] * len(sequences)
    for rows in groups.values():
        group = [sequences[i] for i in rows]
        shared = shared_prefix_length(group)
        if shared:
            stats = _token_statistics_after_prefix(model, group, shared, pad_id, batch_size, device, progress, moments)
        else:
            stats = _token_statistics_whole(model, group, pad_id, batch_size, device, progress, moments)
        for i, row in zip(rows, stats):
            results[i] = row
    return results  # type: ignore[return-value]


def _token_statistics_whole(model, sequences: list[list[int]], pad_id: int, batch_size: int, device: str, progress: str | None,
                            moments: bool) -> list[dict[str, np.ndarray]]:
    import torch

    results: list[dict | None] = [None] * len(sequences)
    model.eval()
    with torch.no_grad():
        for batch in _batches([len(s) for s in sequences], batch_size, progress):
            ids, mask = pad_batch([sequences[i] for i in batch], pad_id, left=False)
            mean, std, logprobs = _next_token_statistics(model, _next_ids(ids), moments, input_ids=ids.to(device), attention_mask=mask.to(device))
            for row, i in enumerate(batch):
                n = len(sequences[i])
                results[i] = {"logprobs": logprobs[row, : n - 1].cpu().numpy(), "mu": mean[row, : n - 1].cpu().numpy(), "sigma": std[row, : n - 1].cpu().numpy()}
    return results  # type: ignore[return-value]


# positions whose [positions, vocab] float32 slab stays in cache (16 x 49k: 3 MB) through the
# several passes the statistics make over the vocabulary; a whole batch's slab goes through memory
# on each pass: 5.9x slower at 16 x 55 positions in a micro-benchmark
STATISTICS_CHUNK = 16


def _distribution_statistics(logits, targets, moments: bool = True):
    """(mean and std of log p under p, log p of the target token) at every position of
    [rows, positions, vocab] logits, with targets [rows, positions]; `moments` False: the mean and
    std are left at 0."""
    import torch

    rows, positions, vocab = logits.shape
    flat, wanted = logits.reshape(-1, vocab), targets.reshape(-1, 1).to(logits.device)
    out = torch.zeros(3, flat.shape[0], device=logits.device)
    for start in range(0, flat.shape[0], STATISTICS_CHUNK):
        end = start + STATISTICS_CHUNK
        x = flat[start:end].float()
        logprobs = x - torch.logsumexp(x, -1, keepdim=True)
        out[2, start:end] = logprobs.gather(1, wanted[start:end]).squeeze(1)
        if moments:
            weighted = logprobs.exp().mul_(logprobs)  # p log p
            out[0, start:end] = weighted.sum(-1)
            out[1, start:end] = weighted.mul_(logprobs).sum(-1)  # E[(log p)^2]
    std = (out[1] - out[0] ** 2).clamp(min=0).sqrt()
    return out[0].reshape(rows, positions), std.reshape(rows, positions), out[2].reshape(rows, positions)


# architectures whose logits are the output head's matmul of the last hidden state (Gemma 2's
# then soft-capped): their statistics can be taken a slice of the vocabulary at a time
FACTORED_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
# vocabulary rows of the output head per matmul: a [positions, 4096] float32 slab of logits stays in
# cache through the passes the statistics make over it, where the whole [positions, vocabulary]
# logits go through memory several times (SmolLM2, 1024 positions: 200 MB)
HEAD_CHUNK = 4096


def _next_token_statistics(model, targets, moments: bool, keep: int = 0, **inputs):
    """`_distribution_statistics` of the model's logits at the last `keep` positions (0: every
    position) of a forward pass with `inputs`; for a FACTORED_HEADS model computed from the last
    hidden state a slice of the vocabulary at a time, never holding the whole logits."""
    head = _factored_head(model)
    if head is None:
        ids = inputs["input_ids"]
        return _distribution_statistics(model(**inputs, logits_to_keep=last_columns(ids.shape[1], keep, ids.device)).logits, targets, moments)
    hidden = model.get_decoder()(**inputs).last_hidden_state
    return _head_statistics(hidden[:, -keep:] if keep else hidden, targets, *head, moments)


def _factored_head(model):
    """(the output head's weight, the final logit soft cap or None) where the logits are that
    matmul of the last hidden state; None for any other model, or a head with a bias or an adapter."""
    import torch

    head = model.get_output_embeddings()
    if getattr(model.config, "model_type", None) not in FACTORED_HEADS or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight, getattr(model.config, "final_logit_softcapping", None)


def _head_statistics(hidden, targets, weight, cap: float | None, moments: bool = True):
    """`_distribution_statistics` from last hidden states [rows, positions, hidden]: the logits of
    HEAD_CHUNK tokens at a time, each row's total probability mass (and with `moments` the first
    two moments of its logits under p) accumulated online about its running maximum logit, the
    slices' sums in float64. About the maximum, not zero: the top token adds exactly 0, so a
    peaked distribution's small spread is not lost to cancellation against logits of tens of nats."""
    import torch

    rows, positions, _ = hidden.shape
    flat, wanted = hidden.reshape(rows * positions, -1), targets.reshape(-1).to(hidden.device)
    n = flat.shape[0]
    top = None
    mass, first, second = (torch.zeros(n, dtype=torch.float64, device=flat.device) for _ in range(3))
    chosen = torch.empty(n, device=flat.device)
    for start in range(0, weight.shape[0], HEAD_CHUNK):
        logits = torch.nn.functional.linear(flat, weight[start : start + HEAD_CHUNK]).float()
        if cap is not None:  # as Gemma 2's forward caps its logits
            logits = logits.div_(cap).tanh_().mul_(cap)
        inside = ((wanted >= start) & (wanted < start + logits.shape[1])).nonzero().squeeze(1)
        chosen[inside] = logits[inside, wanted[inside] - start]
        new_top = logits.amax(-1) if top is None else torch.maximum(top, logits.amax(-1))
        if top is not None:  # re-centre what came before on the new maximum
            shift = (new_top - top).double()
            rescale = shift.neg().exp()
            if moments:  # sum w (z - new) = sum w (z - old) - shift sum w, and likewise for the square
                second = (second - 2 * shift * first + shift**2 * mass) * rescale
                first = (first - shift * mass) * rescale
            mass = mass * rescale
        centred = logits.sub_(new_top[:, None])
        weights = centred.exp()
        # a slice's float32 values summed in float32 (torch's cascade sum: relative error about 1e-7, the
        # values' own precision), the slices' sums in float64; sum(dtype=float64) converted every element
        # and took 40% of the time of the slice's matmul ([1024, 4096]: 10 ms against 0.1 ms)
        mass += weights.sum(-1).double()
        if moments:
            weights.mul_(centred)
            first += weights.sum(-1).double()
            second += weights.mul_(centred).sum(-1).double()
        top = new_top
    log_mass = mass.log()
    logprobs = (chosen.double() - top.double() - log_mass).float().reshape(rows, positions)
    if not moments:
        zeros = torch.zeros(rows, positions, device=flat.device)
        return zeros, zeros, logprobs
    mean_centred = first / mass
    mean = (mean_centred - log_mass).float()  # log p = (z - top) - log mass
    std = (second / mass - mean_centred**2).clamp(min=0).sqrt().float()
    return mean.reshape(rows, positions), std.reshape(rows, positions), logprobs


def _next_ids(ids):
    """The token each position predicts ([rows, positions]; the last column, which predicts
    nothing, gets a placeholder)."""
    import torch

    return torch.cat([ids[:, 1:], ids[:, :1]], dim=1)


def _token_statistics_after_prefix(model, sequences: list[list[int]], shared: int, pad_id: int, batch_size: int, device: str, progress: str | None,
                                   moments: bool) -> list[dict[str, np.ndarray]]:
    """token_statistics with the first `shared` tokens, common to every sequence, run once: their
    key-value cache is copied to each batch of the sequences' remainders (right-padded after it)."""
    import torch
    from transformers import DynamicCache

    prefix = sequences[0][:shared]
    results: list[dict | None] = [None] * len(sequences)
    model.eval()
    with torch.no_grad():
        cache = DynamicCache()
        prefix_ids = torch.tensor([prefix], device=device)
        logits = model(input_ids=prefix_ids, past_key_values=cache, use_cache=True).logits
        mean, std, logprobs = _distribution_statistics(logits, _next_ids(prefix_ids), moments)
        # positions 0..shared-2 predict the shared tokens 1..shared-1; position shared-1 predicts each row's own next token
        head_lp, head_mu, head_sigma = logprobs[0, : shared - 1], mean[0, :shared], std[0, :shared]
        last = logits[0, shared - 1].float().log_softmax(-1)
        for batch in _batches([len(s) - shared for s in sequences], batch_size, progress):
            ids, mask = pad_batch([sequences[i][shared:] for i in batch], pad_id, left=False)
            tail_mean, tail_std, tail_lp = _next_token_statistics(model, _next_ids(ids), moments, **_inputs_after_prefix(cache, shared, ids, mask, device))
            for row, i in enumerate(batch):
                rest = len(sequences[i]) - shared  # tokens after the prefix; the last one predicts nothing
                first = last[ids[row, :1].to(last.device)]
                results[i] = {
                    "logprobs": torch.cat([head_lp, first, tail_lp[row, : rest - 1]]).cpu().numpy(),
                    "mu": torch.cat([head_mu, tail_mean[row, : rest - 1]]).cpu().numpy(), "sigma": torch.cat([head_sigma, tail_std[row, : rest - 1]]).cpu().numpy(),
                }
    return results  # type: ignore[return-value]

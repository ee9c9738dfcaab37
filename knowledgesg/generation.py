"""Batched generation shared by every stage that generates.

Prompts are sorted by length and cut into batches so that little padding is wasted; each batch is
left-padded (so every sequence's next token sits in the last column) and decoded step by step
with the KV cache. The prompts of a batch that begin alike (a chat template and instruction,
few-shot examples) run their common prefix once: its cache is copied to every row, and each row's
own tokens follow it, left-padded after the prefix. A sequence leaves the batch as soon as it
produces its end-of-turn token or reaches the token budget, so short answers do not wait for the longest one (HF `generate` keeps
finished rows in the batch until all are done). Results come back in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from knowledgesg.console import track
from knowledgesg.spec import StrictModel


class SamplingParams(StrictModel):
    max_new_tokens: int = Field(default=96, ge=1, le=8192)
    do_sample: bool = True
    temperature: float = Field(default=0.9, gt=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)


@dataclass(frozen=True)
class Completion:
    text: str
    new_tokens: int
    finished: bool  # stopped at end-of-turn rather than at the token budget


def chat_prompt_ids(tokenizer, user: str, assistant_prefix: str = "") -> list[int]:
    """Token ids of a chat prompt whose assistant turn starts with `assistant_prefix`."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return ids + (tokenizer(assistant_prefix, add_special_tokens=False)["input_ids"] if assistant_prefix else [])


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def last_columns(width: int, count: int = 1, device="cpu"):
    """`logits_to_keep` for the last `count` columns of a `width`-column forward pass (0: every
    column, as transformers reads 0).

    transformers slices the hidden states with it: an int n gives `[:, -n:]`, which for n < width
    does not fold into one matrix across rows, and torch's matmul with a head that needs no
    gradient then multiplies each row by its own copy of the head (55 rows of SmolLM2 in bfloat16:
    272x slower, float32 8x: head_column.md; a quarter of a demo bank's synthesize). An index
    tensor (a documented form of the argument) gathers a contiguous copy instead."""
    import torch

    return count if count in (0, width) else torch.arange(width - count, width, device=device)


SHARED_PREFIX_MIN = 16  # a common prefix shorter than this is not worth a pass of its own


def common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for s in sequences[1:]:
        length = next((i for i in range(length) if s[i] != first[i]), length)
    return length


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one token of its own
    (its last position gives the next-token logits); 0 where that is under SHARED_PREFIX_MIN."""
    if len(sequences) < 2:
        return 0
    shared = min(common_prefix_length(sequences), min(len(s) for s in sequences) - 1)
    return shared if shared >= SHARED_PREFIX_MIN else 0


def run_prefix(model, prefix: list[int], device: str, room: int = 0):
    """The key-value cache of `prefix`, run once as a batch of one, with `room` spare token slots."""
    import torch

    from knowledgesg.kv_cache import RoomyCache  # imports transformers: not when `ksg` starts

    cache = RoomyCache(room)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def after_prefix(mask, width: int):
    """(the mask of rows that continue a `width`-token prefix, prefix included; the positions of
    the rows' own columns). A row's left padding sits between the prefix and its own tokens."""
    import torch

    full = torch.cat([torch.ones((mask.shape[0], width), dtype=mask.dtype, device=mask.device), mask], dim=1)
    return full, (full.cumsum(-1) - 1).clamp(min=0)[:, width:]


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool):
    """(ids, attention mask) as [rows, longest] tensors. Left padding puts every sequence's end in
    the last column (decoding, scoring the last tokens); right padding starts each at position 0."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence)
        mask[row, span] = 1
    return ids, mask


# tokens of each row ranked before its nucleus is looked for: a partial sort (top-k) of 49k logits
# costs a few milliseconds where sorting them all cost 150 ms a decoding step at 64 rows
NUCLEUS_FIRST_K = 256


def nucleus(logits, top_p: float, first_k: int = NUCLEUS_FIRST_K):
    """[rows, vocabulary] True for the tokens of each row's nucleus (top-p): the most likely tokens,
    each kept while the tokens ranked above it hold at most `top_p` of the probability. It is
    looked for among the row's `first_k` most likely tokens; a row whose `first_k` hold no more
    than `top_p` (its nucleus may reach past them) ranks its whole vocabulary. Probabilities and
    their running sums in float64: in float32 a sum over hundreds of tokens drifts by 1e-5, enough
    to move a row's boundary token in 76 of 1729 row-steps (SmolLM2 sampling at top-p 0.95)."""
    import torch

    def keep_of(values, order, log_total):
        probs = (values.double() - log_total).exp()
        cumulative = probs.cumsum(dim=-1)
        return torch.zeros(len(values), logits.shape[-1], dtype=torch.bool, device=logits.device).scatter_(1, order, cumulative - probs <= top_p), cumulative[:, -1]

    values, order = torch.topk(logits, min(first_k, logits.shape[-1]))
    top = values[:, :1]
    # converted, then summed: the same float64 sum as sum(dtype=float64), which took 2.8x as long ([64, 49152])
    log_total = top.double() + (logits - top).exp().double().sum(dim=-1, keepdim=True).log()
    keep, held = keep_of(values, order, log_total)
    wider = (held <= top_p).nonzero().squeeze(1)
    if len(wider):
        ranked, ranking = torch.sort(logits[wider], descending=True)
        keep[wider] = keep_of(ranked, ranking, log_total[wider])[0]
    return keep


class Generator:
    def __init__(self, model, tokenizer, batch_size: int = 16, device: str = "cpu", stop_at_newline: bool = False) -> None:
        """`stop_at_newline`: a completion also ends at a line break (few-shot prompts to a base
        model, whose answer is one line and which would otherwise write the next example)."""
        self.model = model
        self.stop_at_newline = stop_at_newline
        self._newline: dict[int, bool] = {}
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device
        stops = {tokenizer.eos_token_id}
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stops.add(im_end)
        self.stop_ids = sorted(i for i in stops if i is not None)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, progress: str | None = None,
                 budgets: list[int] | None = None) -> list[Completion]:
        """`budgets`: each prompt's own token budget (at most `params.max_new_tokens`), for callers
        whose prompts want answers of different lengths: they still share batches, and a row
        leaves at its own budget."""
        import torch

        if budgets is not None and (len(budgets) != len(prompts) or not all(1 <= b <= params.max_new_tokens for b in budgets)):
            raise ValueError("one budget per prompt, each from 1 to max_new_tokens")
        budgets = budgets or [params.max_new_tokens] * len(prompts)
        results: list[Completion | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        batches = length_batches([len(p) for p in prompts], self.batch_size)
        sampler = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        for batch in track(batches, progress or "generating", total=len(batches)):
            for i, (tokens, finished) in zip(batch, self._decode([prompts[i] for i in batch], pad, params, sampler, [budgets[i] for i in batch])):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if self.stop_at_newline:
                    text = text.split("\n")[0]
                results[i] = Completion(text, len(tokens) + finished, finished)
        return results  # type: ignore[return-value]

    def _decode(self, prompts: list[list[int]], pad: int, params: SamplingParams, sampler, budgets: list[int]) -> list[tuple[list[int], bool]]:
        """Greedy or sampled decoding of one batch of prompts; rows leave when done (at an
        end-of-turn token or their own budget)."""
        import torch

        from knowledgesg.kv_cache import RoomyCache  # imports transformers: not when `ksg` starts

        n = len(prompts)
        shared = shared_prefix_length(prompts)
        longest = max(budgets)
        room = max(len(p) for p in prompts) - shared + longest  # every token this batch will add after the prefix
        cache = run_prefix(self.model, prompts[0][:shared], self.device, room) if shared else RoomyCache(longest)
        ids, own_mask = (t.to(self.device) for t in pad_batch([p[shared:] for p in prompts], pad, left=True))
        mask, positions = after_prefix(own_mask, shared)
        outputs: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        active = list(range(n))
        history = torch.cat([torch.tensor(prompts[0][:shared], dtype=ids.dtype, device=ids.device).repeat(n, 1), ids], dim=1)  # for the repetition penalty
        step_ids = ids
        # rows that repeat a prompt (several samples of one prompt) share one prefill: the unique rows
        # run, and their cache and logits are copied out to every row that repeats them
        unique, copy_of = torch.unique(torch.cat([ids, own_mask], dim=1), dim=0, return_inverse=True)
        shared_prefill = len(unique) < n
        if shared:
            cache.batch_repeat_interleave(len(unique) if shared_prefill else n)
        with torch.no_grad():
            for step in range(longest):
                if step == 0 and shared_prefill:
                    prompt_ids = unique[:, : ids.shape[1]]
                    prompt_mask, prompt_positions = after_prefix(unique[:, ids.shape[1] :], shared)
                else:
                    prompt_ids, prompt_mask, prompt_positions = step_ids, mask, positions
                # logits for the last column only: in the prefill, the head over every prompt position
                # would cost a fifth of SmolLM2's flops and more than half of Gemma 3's (262k vocabulary)
                logits = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, past_key_values=cache, use_cache=True,
                                    logits_to_keep=last_columns(prompt_ids.shape[1], device=self.device)).logits[:, -1, :].float()
                if step == 0 and shared_prefill:
                    cache.batch_select_indices(copy_of)
                    logits = logits[copy_of]
                chosen = self._choose(logits, history, params, sampler)
                keep = []
                for row, token in enumerate(chosen.tolist()):
                    owner = active[row]
                    if token in self.stop_ids:
                        finished[owner] = True
                        continue
                    if self.stop_at_newline and self._has_newline(token):
                        outputs[owner].append(token)  # the line's own text may precede the break
                        finished[owner] = True
                        continue
                    outputs[owner].append(token)
                    if len(outputs[owner]) < budgets[owner]:
                        keep.append(row)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=ids.device)
                    cache.batch_select_indices(index)
                    mask, positions, history, chosen = mask[index], positions[index], history[index], chosen[index]
                    active = [active[row] for row in keep]
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], dim=1)
                positions = positions[:, -1:] + 1
                step_ids = chosen[:, None]
                history = torch.cat([history, step_ids], dim=1)
        return list(zip(outputs, finished))

    def _has_newline(self, token: int) -> bool:
        if token not in self._newline:
            self._newline[token] = "\n" in self.tokenizer.decode([token])
        return self._newline[token]

    @staticmethod
    def _choose(logits, history, params: SamplingParams, sampler):
        import torch

        if params.repetition_penalty != 1.0:  # CTRL's penalty, as transformers applies it
            seen = torch.gather(logits, 1, history)
            logits = logits.scatter(1, history, torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty))
        if not params.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            logits = logits.masked_fill(~nucleus(logits, params.top_p), float("-inf"))
        # inverse-CDF sampling: the same distribution as torch.multinomial, which took 12 s of a
        # profiled demo audit's decoding; `right`: a token of probability 0 (cut by top-k or
        # top-p) has a flat CDF step and is never chosen
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        u = torch.rand((cdf.shape[0], 1), generator=sampler, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)

"""DP-SGD on Opacus: Poisson sampling over privacy units, per-unit clipping, Gaussian noise.

Opacus computes per-row gradients (`GradSampleModule`) and its `DPOptimizer` clips, noises and
scales them. What we add around it:
- sampling over *units*: a unit is a record, or for user-level privacy all of a user's records,
  whose row gradients are summed into one unit gradient before clipping;
- virtual steps: a logical Poisson batch is split into physical micro-batches (whole units
  only, grouped by length to waste little padding) with the optimizer's skip-step signal, the
  mechanism Opacus's BatchMemoryManager uses;
- empty Poisson batches take a noise-only step, which the accountant counts like any other;
- the Poisson coins and the Gaussian noise come from a `privacy.noise.SecureRandom` (OS entropy
  on the client), never from torch's seeded generator (`SecureDPOptimizer`);
- a trainable linear layer's backward gives its input's gradient only (`_LinearPerUnitOnly`):
  its weight's update is the clipped sum of the per-unit gradients, and autograd's own summed
  gradient of the same weight, computed by default and never read, took about 0.1 s of a 3.3 s
  step (LoRA r=16 on every linear layer, batch 8 x 128 tokens).
The non-private reference runs through this same code with noise 0 and no clipping.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from knowledgesg.errors import KsgError
from knowledgesg.memory import keep_freed_memory, release_freed_memory
from privacy.noise import SecureRandom


def poisson_batches(num_units: int, sample_rate: float, steps: int, coins: SecureRandom) -> Iterator[list[int]]:
    """Each step, every unit joins independently with probability `sample_rate` (may be empty)."""
    for _ in range(steps):
        yield np.flatnonzero(coins.bernoulli(num_units, sample_rate)).tolist()


class _LinearPerUnitOnly(torch.autograd.Function):
    """y = x W^T + b whose backward gives x's gradient and none for W and b: under DP-SGD their
    update comes from Opacus's per-unit gradients (its hooks on the module see the same input and
    output gradient), so the summed gradient autograd would also compute is work thrown away."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_x = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _per_unit_only_forward(module: torch.nn.Linear, sampler: GradSampleModule):
    def forward(input: torch.Tensor) -> torch.Tensor:  # nn.Linear.forward's own parameter name
        # the condition under which Opacus records the layer's input for per-unit gradients; in
        # eval, under no_grad, or once the hooks are off, the layer is an ordinary linear layer
        if sampler.hooks_enabled and module.training and torch.is_grad_enabled():
            return _LinearPerUnitOnly.apply(input, module.weight, module.bias)
        return F.linear(input, module.weight, module.bias)

    return forward


class SecureDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its noise drawn from a SecureRandom instead of torch's generator
    (torch's CPU generator is a Mersenne Twister: seeded, it can be replayed)."""

    def __init__(self, *args, noise: SecureRandom, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise = noise

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        sizes = [p.summed_grad.numel() for p in self.params]
        # one draw for every parameter: the same independent values, without the cost of 420
        # small draws (LoRA r=16 on every linear layer) each paying its own per-call overheads
        noise = self.noise.normal((sum(sizes),), std, self.params[0].summed_grad.dtype)
        for p, values in zip(self.params, noise.split(sizes)):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + values.view_as(p.summed_grad).to(p.summed_grad.device)).view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Opacus's division by the expected batch size, as one call over every gradient."""
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)


def micro_batches(units: list[int], rows_per_unit: list[int], widths: list[int], max_rows: int, pass_overhead_tokens: int = 64) -> list[list[int]]:
    """Split a logical batch into physical ones of whole units, grouped by length.

    A unit is never split (it would be clipped twice) and rows of different units never share a
    row. Each physical batch is padded to its longest row, so its cost is about rows x width
    tokens, plus a fixed cost per forward pass (`pass_overhead_tokens`, in token-equivalents).
    Units sorted longest first are cut into the contiguous groups of least total cost (dynamic
    programming; at most `max_rows` rows each). The DP update is a sum of clipped unit gradients,
    so the grouping changes only the order of a float sum.
    """
    order = sorted(units, key=lambda u: (-widths[u], u))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[i]: least cost of the first i units
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        rows = 0
        for start in range(end - 1, -1, -1):  # group order[start:end], padded to order[start]'s width
            rows += rows_per_unit[order[start]]
            if rows > max_rows and start < end - 1:
                break
            cost = best[start] + rows * widths[order[start]] + pass_overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def unit_means(per_row: torch.Tensor, row_unit: torch.Tensor, n_units: int) -> torch.Tensor:
    """Each unit's loss as the mean of its rows' losses, shape [n_units]."""
    rows_in_unit = torch.bincount(row_unit, minlength=n_units)
    return torch.zeros(n_units, dtype=per_row.dtype, device=per_row.device).index_add_(0, row_unit, per_row / rows_in_unit[row_unit])


@dataclass(frozen=True)
class DPSGDSettings:
    noise_multiplier: float  # 0 for the non-private reference
    clip_norm: float  # math.inf for the non-private reference
    sample_rate: float
    expected_batch_units: float


class DPSGD:
    """A model wrapped for per-unit gradients, with its DP optimizer and accountant."""

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], settings: DPSGDSettings, noise: SecureRandom) -> None:
        self.settings = settings
        # Built from the trainable parameters only, after the model is on its device: an
        # optimizer made earlier holds stale tensors and silently never updates the adapter.
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise KsgError("the model has no trainable parameters (LoRA was not applied?)")
        if any(p.dtype != torch.float32 for p in self.params):
            # per-unit gradients take the dtype of their parameter: with a bfloat16 adapter a
            # clipped unit's norm came out up to 0.9% above C, and the noise is calibrated to C
            raise KsgError(f"DP-SGD trains float32 parameters only (found {sorted({str(p.dtype) for p in self.params})}): a lower precision would clip inexactly")
        keep_freed_memory()  # per-unit gradients are allocated and freed every step
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.optimizer = SecureDPOptimizer(
            make_optimizer(self.params),
            noise_multiplier=settings.noise_multiplier,
            # No clipping is an infinite norm, but Opacus's noise std is sigma * C and 0 * inf is
            # NaN: the largest finite float clips nothing and keeps 0 * C == 0.
            max_grad_norm=settings.clip_norm if math.isfinite(settings.clip_norm) else sys.float_info.max,
            expected_batch_size=max(1, round(settings.expected_batch_units)),
            loss_reduction="mean",
            noise=noise,
        )
        self.accountant = PRVAccountant()
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=settings.sample_rate))
        self.steps = 0
        self.empty_steps = 0
        self._closed = False
        # last, so that a refusal above leaves every layer as it was; a layer with a forward of its
        # own (another library's hook) keeps it, and its summed gradient
        self._per_unit_only = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m) and all(p.requires_grad for p in m.parameters())]
        for layer in self._per_unit_only:
            layer.forward = _per_unit_only_forward(layer, self.module)

    @property
    def private(self) -> bool:
        return self.settings.noise_multiplier > 0 and math.isfinite(self.settings.clip_norm)

    def step(self, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor, int]], unit_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, int], torch.Tensor]) -> float | None:
        """One logical DP-SGD step over physical batches of (inputs, row->unit index, units).

        `unit_loss` returns each unit's loss, shape [units]; their sum is differentiated (the
        optimizer divides the noisy sum by the expected batch size). Returns the mean unit loss.
        """
        if not batches:
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            self.optimizer.step()  # clip nothing, add noise, count the step
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
            self.empty_steps += 1
            return None
        total, units = 0.0, 0
        for index, (inputs, row_unit, n_units) in enumerate(batches):
            losses = unit_loss(self.module, inputs, row_unit, n_units)
            with warnings.catch_warnings():
                # With frozen embeddings no layer input needs a gradient, so PyTorch notes that
                # the full backward hooks fire on output gradients, which is all Opacus uses.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            if len(row_unit) != n_units:  # user level: sum row gradients into unit gradients
                for p in self.params:
                    summed = torch.zeros((n_units, *p.shape), dtype=p.grad_sample.dtype, device=p.device)
                    p.grad_sample = summed.index_add_(0, row_unit.to(p.device), p.grad_sample)
            self.optimizer.signal_skip_step(do_skip=index < len(batches) - 1)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += float(losses.detach().sum())
            units += n_units
        self.steps += 1
        return total / units

    def close(self) -> None:
        """Unwrap the model (hooks off, linear layers as they were: a copy or a later non-DP backward
        of a model left wrapped would get no summed gradients) and hand the kept memory back."""
        if self._closed:
            return
        self.module._close()
        for layer in self._per_unit_only:
            vars(layer).pop("forward", None)
        self._closed = True
        keep_freed_memory(False)
        release_freed_memory()

    def accounted_history(self) -> list[tuple[float, float, int]]:
        """What the accountant saw, merged: [(sigma, q, steps)]."""
        merged: dict[tuple[float, float], int] = {}
        for sigma, q, n in self.accountant.history:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + n
        return [(sigma, q, n) for (sigma, q), n in merged.items()]

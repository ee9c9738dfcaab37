"""Stage `tune_professional` (server): make the professional model a domain expert from public data.

The seed paper's professional model is a domain expert (for finance, a model tuned on public
financial sentiment). None is packaged here, so this stage builds one: LoRA on
`models.professional`, trained without noise on a public labelled source only (e.g.
`{builtin: fiqa_train}`), in the prompt format that `refine` labels with and `evaluate` scores
with (`eval.benchmarks.context_ids`, the answer after it). No private record is read: the stage
runs on the server, its data is named in the spec, and `summary.json` records it as public.

A `refine` or `evaluate` stage after this one uses the tuned professional (the model named in
`models.professional` with this adapter merged). A user with a real expert model names it in
`models.professional` instead and leaves this stage out.
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import Field

from eval.benchmarks import choice_ids, context_ids
from knowledgesg.adapters import ADAPTER_FILES, ADAPTER_WEIGHTS, save_adapter, with_lora
from knowledgesg.console import console, progress_bar
from knowledgesg.errors import KsgError, SpecError
from knowledgesg.loaders import load_labelled_pool, refuse_client_data, source_name_of, source_path
from knowledgesg.models import Precision, ResolvedModel, load_causal_lm, resolve_device, resolve_precision
from knowledgesg.prompts import user_message
from knowledgesg.records import InstructionRecord
from knowledgesg.spec import DataSource, PipelineSpec, StrictModel
from knowledgesg.stage import Stage, StageContext

ADAPTER = "adapter"


class TuneProfessionalParams(StrictModel):
    data: DataSource = Field(description="public labelled instruction records, e.g. {builtin: fiqa_train}; never a client's data")
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    max_length: int = Field(default=128, ge=16)
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    precision: Precision = Field(default="float32", description="the professional's frozen weights (auto: bfloat16 where native); its adapter trains in float32")


def answer_example(tokenizer, record: InstructionRecord, max_length: int):
    """The record's user turn as `evaluate` and `refine` prompt it, then its response; the loss
    covers the response only. Too long: the prompt loses its oldest tokens."""
    from knowledgesg.sft import IGNORE, Example  # torch and opacus: not when the stage registry is imported

    prompt = context_ids(tokenizer, user_message(record))
    answer = (choice_ids(tokenizer, record.response.strip()) + [tokenizer.eos_token_id])[: max_length // 2]
    prompt = prompt[-(max_length - len(answer)):]
    return Example(input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer)


class TuneProfessional(Stage):
    name = "tune_professional"
    Params = TuneProfessionalParams
    runs_on = "server"
    uses = ("models", "clients")  # a change of the clients' data sources in the spec reruns the stage, and so its check
    reads = ("prepare_models",)  # not synthesize's pairs: changing them does not retune the professional

    def requires(self) -> tuple[str, ...]:
        return ("prepare_models",)

    def external_inputs(self, spec: PipelineSpec, base_dir: Path) -> list[Path]:
        return [source_path(self.params.data, base_dir, f"{self.name} params.data")]

    def preflight(self, spec: PipelineSpec, base_dir: Path) -> None:
        if spec.models.professional is None:
            raise SpecError("models.professional: missing, and tune_professional needs it (the model it tunes, e.g. gemma-3-270m)")
        refuse_client_data(self.params.data, spec.clients.sources(), base_dir, "tune_professional params.data")
        self.public_records(base_dir, spec.seed)  # before the run starts: the stage may come after dp_train

    def public_records(self, base_dir: Path, seed: int) -> list[InstructionRecord]:
        p: TuneProfessionalParams = self.params
        records = load_labelled_pool(p.data, base_dir, seed, "tune_professional params.data")
        if len(records) < p.batch_size:
            raise SpecError(f"tune_professional params.batch_size: {p.batch_size}, more than the {len(records)} records with a response in params.data ({p.data.builtin or p.data.path})")
        return records

    def run(self, ctx: StageContext) -> None:
        import torch

        from knowledgesg.sft import batch_token_loss, collate  # imports torch and opacus: not when `ksg` starts

        p: TuneProfessionalParams = self.params
        records = self.public_records(ctx.base_dir, ctx.seed)
        professional = ctx.models()["professional"]
        device = resolve_device(ctx.spec.models.device)
        torch.manual_seed(ctx.derive_seed("init"))
        dtype = resolve_precision(p.precision, device)
        model, tokenizer = load_causal_lm(ResolvedModel(**professional), device, dtype, training=True)
        model = with_lora(model, p.lora_r, p.lora_alpha, p.target_modules, "tune_professional params.target_modules")
        model.train()
        examples = [answer_example(tokenizer, r, p.max_length) for r in records]
        optimizer = torch.optim.Adam([t for t in model.parameters() if t.requires_grad], lr=p.learning_rate)
        order = random.Random(ctx.derive_seed("order"))
        steps = max(1, round(p.epochs * len(examples) / p.batch_size))
        losses = []
        with progress_bar() as bar:
            task = bar.add_task(f"tune_professional on {len(examples)} public records", total=steps)
            batches = self._batches(len(examples), p.batch_size, steps, order)
            for step, rows in enumerate(batches, start=1):
                loss = batch_token_loss(model, collate([examples[i] for i in rows], tokenizer.pad_token_id), device)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append({"step": step, "loss": round(loss.item(), 6)})
                bar.update(task, advance=1)
        if not torch.isfinite(torch.tensor(losses[-1]["loss"])):
            raise KsgError(f"tune_professional: the loss diverged ({losses[-1]['loss']}); lower learning_rate")
        save_adapter(model, professional["name"], ctx.path(ADAPTER))
        for name in ADAPTER_FILES:
            ctx.declare_output(f"{ADAPTER}/{name}")
        ctx.write_json("loss.json", losses)
        ctx.write_json("summary.json", {
            "data": "public", "source": source_name_of(p.data), "records": len(examples), "steps": steps, "epochs": p.epochs,
            "professional_model": {"name": professional["name"], "weights_sha256": professional["weights_sha256"], "dtype": dtype},
            "prompt_format": "evaluate's: the user turn through the chat template if the tokenizer has one, else followed by 'Answer:'",
            "first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"],
            "privacy": "trained on public data only: no client record is read, no privacy budget is spent",
        })
        console.print(f"tune_professional: {steps} steps on {len(examples)} public records from {source_name_of(p.data)}, loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}")

    @staticmethod
    def _batches(n: int, batch_size: int, steps: int, order: random.Random) -> list[list[int]]:
        """Shuffled epochs cut into batches, `steps` of them (public data: no sampling to account)."""
        batches: list[list[int]] = []
        while len(batches) < steps:
            indices = list(range(n))
            order.shuffle(indices)
            batches += [indices[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        return batches[:steps]


def tuned_professional_adapter(ctx: StageContext) -> Path | None:
    """The adapter a completed `tune_professional` before this stage made, or None."""
    if TuneProfessional.name not in ctx.completed_stages_before():
        return None
    return ctx.artifact(TuneProfessional.name, f"{ADAPTER}/{ADAPTER_WEIGHTS}").parent

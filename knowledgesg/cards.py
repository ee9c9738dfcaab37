"""Model and dataset cards (Hugging Face format: YAML front matter, then Markdown) that carry the
privacy statement of what they describe, from the run's ledger."""

from __future__ import annotations

import math

import yaml

from knowledgesg import __version__
from privacy.count import COUNT_RELEASE
from privacy.ledger import LedgerEntry, client_delta, composed_total
from privacy.units import UNIT_NAMES


def front_matter(fields: dict) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def _eps(value: float) -> str:
    return "inf (NOT PRIVATE)" if math.isinf(value) else f"{value:.3f}"


def privacy_statement(releases: dict[str, list[LedgerEntry]]) -> str:
    """Per client: its unit, N, the composed epsilon at its delta, and whom it holds against."""
    rows = ["| client | unit of privacy | N | epsilon (PLD, composed over every release of its data) | delta | N x delta | releases with a cost | holds against |",
            "|---|---|---|---|---|---|---|---|"]
    for client, entries in releases.items():
        delta = client_delta(entries)
        counted = [e for e in entries if e.costs_privacy]
        units = ", ".join(dict.fromkeys(UNIT_NAMES.get(e.unit, e.unit) for e in counted)) or "-"
        sizes = [e.num_units for e in counted if e.num_units is not None]
        count = next((e for e in entries if e.release == COUNT_RELEASE), None)
        n = (f"{sizes[-1]} (noised count, sigma {count.mechanism.noise_multiplier:g})" if count else f"{sizes[-1]} (public)") if sizes else "-"
        n_delta = f"{sizes[-1] * delta:.1e}" if sizes else "-"
        trust = "; ".join(dict.fromkeys(e.trust for e in counted)) or "no release of private data"
        rows.append(f"| {client} | {units} | {n} | {_eps(composed_total(entries, delta).reported)} | {delta:.1e} | {n_delta} | "
                    f"{', '.join(f'{e.stage}: {e.release}' for e in counted) or '-'} | {trust} |")
    client_level = [(c, e) for c, entries in releases.items() for e in entries if not e.counts_against_budget]
    lines = [*rows, ""]
    if client_level:
        lines += ["Client-level DP-FedAvg (unit: a whole client; it holds against holders of the final model only, not against the server, "
                  "which adds that noise and sees each clipped update):", ""]
        lines += [f"- {c}: epsilon {_eps(e.epsilon.reported)} at delta {e.delta:.1e}" + ("" if e.private else " (**NOT PRIVATE**: the server's noise came from the public spec seed)")
                  for c, e in client_level] + [""]
    reproducible = any(e.noise == "reproducible" for entries in releases.values() for e in entries)
    drawn = ("Noise came from the public spec seed (privacy.reproducible_noise), not OS entropy" if reproducible
             else "Noise was drawn on each client from OS entropy for every release" + (", but for client-level DP-FedAvg's, which the server draws" if client_level else ""))
    noised = any(e.release == COUNT_RELEASE for entries in releases.values() for e in entries)
    size = ("N is each client's noised count of its units (a Gaussian release in its ledger, composed above)" if noised
            else "N is treated as public (privacy.count_noise: 0)")
    lines += [f"{drawn}; {size}. Every release of a client's data is composed, this run's and any its ledger holds from reruns and "
              "earlier runs; the full report, with the threat model: `ksg privacy-report RUN`."]
    if any(not e.private and e.mechanism.kind != "post_processing" for entries in releases.values() for e in entries):
        lines += ["", "**NOT PRIVATE**: at least one release had no noise, or noise anyone with the spec can regenerate (privacy.reproducible_noise)."]
    return "\n".join(lines)


def evaluation_table(results: dict | None) -> str:
    if not results:
        return "Not evaluated in this run (add the `evaluate` stage before `publish`, or run `ksg eval RUN`)."
    names = [n for n in results["models"] if "tasks" in results["models"][n]]
    tasks = list(dict.fromkeys(task for name in names for task in results["models"][name]["tasks"]))
    rows = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name in names:
        scores = results["models"][name]["tasks"]
        cells = ["; ".join(f"{mode} {s['accuracy']:.3f} (n={s['n']})" for mode, s in scores.get(task, {}).items()) or "-" for task in tasks]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + ("\n\nAccuracy on the same seeded items for every model; `logprob`: the most likely choice, `generation`: greedy, parsed; "
                               "`logprob_calibrated`: the most likely choice after the label prior below.")


def training_data(job: dict, data_rows: str) -> str:
    """What the final tuning read: the clients' synthetic pairs, or (`fedtune data: private`) their
    private records, with local DP-SGD (its epsilon in the privacy section above)."""
    if job.get("data") == "private":
        return ("Each client trained on its own private records with DP-SGD local steps (`fedtune data: private`, DP-FedAvg): "
                "they never left the client, and each round's update is a release in its ledger, composed above.")
    return ("Each client trained on the synthetic pairs its own DP adapter produced from public prompts, as filtered and relabelled on the server;\n"
            "no private record was trained on in this stage and none entered a prompt.\n\n| client | synthetic pairs |\n|---|---|\n" + data_rows)


def model_card(spec_name: str, base: dict, job: dict, synthetic: dict[str, int], stages: list[str], releases: dict[str, list[LedgerEntry]], results: dict | None,
               label_prior: dict | None = None) -> str:
    matter = front_matter({"library_name": "peft", "base_model": base["name"], "tags": ["knowledgesg", "lora", "differential-privacy", "federated-learning", "synthetic-data"],
                           "pipeline_tag": "text-generation"})
    data_rows = "\n".join(f"| {client} | {count} |" for client, count in synthetic.items())
    return f"""{matter}
# {spec_name}: final adapter

A LoRA adapter (r={job['lora']['r']}, alpha={job['lora']['alpha']}, on {', '.join(job['lora']['target_modules'])}) for `{base['name']}`
(weights sha256 `{base['weights_sha256']}`), tuned by federated {job['rule']['name']} over {len(job['clients'])} clients for
{job['rounds']} rounds. Made by KnowledgeSG {__version__}.

## Privacy

{privacy_statement(releases)}

## Training data

{training_data(job, data_rows)}

## Stages

{' -> '.join(stages)}

## Evaluation

{evaluation_table(results)}
{_label_prior_section(label_prior)}
## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("<the base model>")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""


def _label_prior_section(prior: dict | None) -> str:
    if prior is None:
        return ""
    rows = "\n".join(f"| {label} | {share:.3f} | {mean:.3f} | {bias:+.3f} |" for label, share, mean, bias in zip(prior["labels"], prior["shares"], prior["model_mean"], prior["bias"]))
    return f"""
## Label prior (`label_prior.json`)

Fitted by the `calibrate` stage on the {prior['pairs']} synthetic pairs the final tuning read (no private record): add each label's bias
to its log-probability before choosing, where the answer is one of these labels (`ksg eval --published` does).

| label | share in the pairs | the adapter's mean probability on them | bias |
|---|---|---|---|
{rows}
"""


def dataset_card(spec_name: str, stage: str, counts: dict[str, int], stats: dict[str, dict], refine_summary: dict | None, releases: dict[str, list[LedgerEntry]]) -> str:
    matter = front_matter({"pretty_name": f"{spec_name} synthetic data", "tags": ["knowledgesg", "synthetic-data", "differential-privacy"],
                           "size_categories": ["n<1K" if sum(counts.values()) < 1000 else "1K<n<10K"]})
    rows = "\n".join(f"| {client} | {counts[client]} | {stats.get(client, {}).get('generated', '-')} | {_rejections(stats.get(client, {}))} |" for client in counts)
    refine = ""
    if refine_summary:
        refine = "\n## Refinement\n\n" + f"Professional model `{refine_summary['professional_model']}` ({refine_summary['method']}).\n\n" + "\n".join(
            f"- {client}: {_figures(figures)}" for client, figures in refine_summary["clients"].items()) + "\n"
    return f"""{matter}
# {spec_name}: synthetic data

Instruction-response pairs generated by each client's DP adapter from public prompts only (stage `{stage}`). Generation from a DP
release is post-processing: these pairs cost no privacy beyond the adapters they came from. Load with
`datasets.load_from_disk("path/to/this/directory")`. Columns: id, client_id, source, instruction, input, response, provenance
(JSON: seed prompt, sampling, adapter hash).

## Privacy

{privacy_statement(releases)}

## Filtering

| client | kept | generated | rejected |
|---|---|---|---|
{rows}
{refine}"""


def _figures(figures: dict) -> str:
    return ", ".join(f"{key.replace('_', ' ')} " + (", ".join(f"{k} {v}" for k, v in value.items()) or "none" if isinstance(value, dict) else str(value))
                     for key, value in figures.items())


def _rejections(stats: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(stats.get("rejected", {}).items()) if n) or "-"

"""The audit report: `audit_report.json` and `audit_report.html` (plots embedded), written atomically.

Every section of the page is a table or a figure; each row names the release it is about, and the
canary rows end with what a reader should conclude (`conclusion`)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from eval.metrics import DECLARED_GUESSING
from knowledgesg.fileio import write_json, write_text

PLANTED, ABSENT = "#c0392b", "#7f8c8d"
MIA_NAMES = {"loss": "loss", "zlib": "zlib", "reference": "reference (base model)", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++", "rmia": "RMIA-style (base model)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf (NOT PRIVATE)"
    return f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def conclusion(run: dict | None, claimed: float | None, curve: dict | None = None) -> str:
    """What the one-run figures let a reader conclude about a release (and, when its training loss
    rose again at the end, that a low figure may be a model that forgot, not one that was private)."""
    verdict = _one_run_verdict(run, claimed)
    if curve and curve.get("rose_at_end"):
        verdict += (f" CAUTION: its training loss rose at the end ({curve['lowest']:.2f} at best, {curve['last']:.2f} over the last tenth of the steps): "
                    "the released model may have forgotten what it fit, so a low bound here does not show that training was private.")
    return verdict


def _one_run_verdict(run: dict | None, claimed: float | None) -> str:
    if run is None:
        return "No one-run bound: it needs canaries planted with probability 1/2 (audit.canaries.include_probability)."
    bound, certifiable = run["epsilon_lower_bound"], run["largest_certifiable"]
    if claimed is None or math.isinf(claimed):
        if bound > 0:
            return f"No guarantee is claimed, and the audit shows leakage: epsilon is at least {bound:.2f}."
        return "No guarantee is claimed; this audit found no leakage, which does not show the release is private."
    if bound > claimed:
        # each release's bound holds at its confidence on its own: with several audited, one of them
        # crosses a true claim by chance more often (up to 14% for three at 95%)
        return (f"VIOLATION: the audited lower bound {bound:.2f} exceeds the claimed {claimed:.2f}: the DP implementation or its accounting is wrong, "
                f"or, at {run.get('confidence', 0.95):.0%} for this release alone, chance; a rerun with another spec seed tells them apart.")
    blind = certifiable < claimed  # even a release that leaked everything would have shown at most `certifiable`
    if bound > 0:
        caveat = f" This design certifies at most {certifiable:.2f}, so it could not have caught a breach of the claim." if blind else ""
        return f"Consistent with the claim: leakage measured (epsilon at least {bound:.2f}), within the claimed {claimed:.2f}.{caveat}"
    if blind:
        return (f"Consistent with the claim, but the audit could not have caught a breach of it: this design certifies at most {certifiable:.2f}, "
                f"below the claimed {claimed:.2f}. More canaries raise that ceiling.")
    return (f"Consistent with the claim: no leakage detected, though this design could certify up to {certifiable:.2f}. A one-run audit is "
            f"a lower bound: it does not show the release is any more private than the claimed {claimed:.2f}.")


# -- figures ---------------------------------------------------------------------------------------


def loss_drop_figure(section: dict) -> str | None:
    """For each audited model: how far training lowered each canary's secret loss, planted against
    not planted, one panel per model and kind."""
    plt = _pyplot()
    models = [(name, t) for name, t in section["targets"].items() if "loss_drop_vs_base" in t]
    if not models:
        return None
    kinds = list(section["kinds"])
    fig, axes = plt.subplots(len(kinds), len(models), figsize=(4.6 * len(models), 3.2 * len(kinds)), squeeze=False)
    for column, (name, result) in enumerate(models):
        for row, kind in enumerate(kinds):
            ax = axes[row][column]
            rows = [(x, c["included"]) for x, c in zip(result["loss_drop_vs_base"], section["canaries"]) if c["kind"] == kind]
            ax.hist([[x for x, p in rows if p], [x for x, p in rows if not p]], bins=25, label=["planted", "not planted"], color=[PLANTED, ABSENT])
            ax.set_title(f"{name}: {kind} canaries", fontsize=9)
            ax.set(xlabel="loss drop vs base (nats)", ylabel="canaries")
            ax.legend(fontsize=7)
    return _png(fig)


def roc_figure(curves: dict[str, dict], title: str) -> str | None:
    """ROC curves on log-log axes: what matters is the TPR at low FPR."""
    plt = _pyplot()
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, result in curves.items():
        ax.plot([max(x, 1e-4) for x in result["fpr"]], [max(y, 1e-4) for y in result["tpr"]], label=f"{name} (AUC {result['auc']:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], color="#999", linestyle=":")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate", xlim=(1e-3, 1), ylim=(1e-3, 1.05))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def epsilon_figure(section: dict) -> str | None:
    plt = _pyplot()
    names = [n for n, t in section["targets"].items() if t["kinds"]["all"]["one_run"] is not None]
    if not names:
        return None
    audits = [section["targets"][n]["kinds"]["all"]["one_run"] for n in names]
    claimed = [section["targets"][n]["claimed"]["epsilon"] for n in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 3, 3.6))
    ax.bar(names, [a["epsilon_lower_bound"] for a in audits], color="#2980b9", label="audited lower bound (95%)")
    ax.scatter(names, [a["largest_certifiable"] for a in audits], color="#7f8c8d", marker="v", label="largest certifiable by this design")
    finite = [(i, c) for i, c in enumerate(claimed) if c is not None and not math.isinf(c)]
    if finite:
        ax.scatter([i for i, _ in finite], [c for _, c in finite], color=PLANTED, marker="_", s=900, linewidths=3, label=f"claimed epsilon, group of {section['group_size']}")
    ax.set(title=f"epsilon: claimed and audited ({section['client']}, all canaries)", ylabel="epsilon")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7)
    return _png(fig)


def _img(data: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">' if data else "<p>(nothing to plot)</p>"


def _table(header: list[str], rows: list[list[str]], empty: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>" if rows else f"<p>{html.escape(empty)}</p>"


# -- sections ----------------------------------------------------------------------------------------


def training_html(training: dict | None) -> str:
    if not training:  # an audit from before the section existed
        return "<p>Not in this audit (rerun <code>ksg audit</code> to add it).</p>"
    rows = [[html.escape(name), str(c["steps_with_loss"]), f"{c['first']:.3f}", f"{c['lowest']:.3f}", f"{c['last']:.3f}",
             "<b>yes: read its figures with care</b>" if c["rose_at_end"] else "no"] for name, c in training["releases"].items()]
    return (f"<p>Mean training loss over tenths of each DP adapter's steps (its client's <code>loss.json</code>). A release whose loss rose again at the end "
            f"(last tenth above {training['rose_factor']:g}x its lowest) may have forgotten what it fit: its audit figures then understate what training can leak.</p>"
            + _table(["release", "steps with a loss", "first tenth", "lowest tenth", "last tenth", "rose at the end"], rows, "No training loss recorded for the audited releases."))


def canary_html(canaries: dict | None, training: dict | None = None) -> str:
    esc = html.escape
    # an audit written before the section recorded its way of guessing used the declared default
    if not canaries:
        return "<p>No canaries in this run's spec (<code>audit.canaries</code>).</p>"
    design = _table(["kind", "canaries", "planted", "log2 |R| (bits)", "exposure measured on", "exposure method"],
                    [[esc(k), str(d["count"]), str(d["planted"]), f"{d['space_log2']:.1f}", str(d["exposure_measured"]), esc(d["method"])] for k, d in canaries["kinds"].items()], "")
    rows, verdicts = [], []
    for name, result in canaries["targets"].items():
        claimed = result["claimed"]["epsilon"]
        for kind, entry in result["kinds"].items():
            run, member = entry["one_run"], entry.get("membership") or {}
            exposure = f"{_num(entry.get('mean_exposure_planted'), 2)} / {_num(entry.get('mean_exposure_not_planted'), 2)}" if "mean_exposure_planted" in entry else "-"
            extracted = (f"{entry['greedy_extracted_planted']} / {entry['tried_planted']} (not planted: {entry['greedy_extracted_not_planted']})" if "greedy_extracted_planted" in entry
                         else f"whole secret: {entry['whole_secret_found_planted']} / {entry['planted']} (not planted: {entry['whole_secret_found_not_planted']})")
            bound = [f"<b>{run['epsilon_lower_bound']:.3f}</b>", f"{run['correct']} / {run['guesses']}" + (" (all 'in')" if run.get("in_only") else " (half 'in')"), f"{run['largest_certifiable']:.3f}"] if run else ["n/a"] * 3
            rows.append([esc(name), esc(kind), f"{entry['planted']} / {entry['canaries']}", _num(claimed), *bound, tpr_cell(member, "1pct") if member else "n/a",
                         f"{member['auc']:.3f}" if member else "n/a", exposure, extracted])
        verdicts.append([esc(name), esc(result["release"]), esc(conclusion(result["kinds"]["all"]["one_run"], claimed, (training or {}).get("releases", {}).get(name)))])
    table = _table(["release", "canaries", "planted / all", f"claimed epsilon (group of {canaries['group_size']})", "audited lower bound (95%)", "correct / guesses",
                    "largest certifiable", "TPR at 1% FPR [95% CI]", "AUC", "mean exposure planted / not (bits)", "extracted (greedy), of the planted in the exposure sample"], rows, "")
    return f"""<p>{canaries['count']} canaries in client {esc(canaries['client'])}, each planted with probability {canaries.get('include_probability', 0.5):g} ({canaries['planted']} planted), {canaries['repeats']} cop{'y' if canaries['repeats'] == 1 else 'ies'} each.
A canary's copies are a group of {canaries['group_size']} privacy unit(s): the lower bound certifies the epsilon of such a group at the client's delta, so it is compared with the claimed group
epsilon (<code>privacy.accounting.group_epsilon</code>). Every canary is scored by how far training lowered the loss of its secret's own tokens below the base model's; the one-run bound
(Steinke, Nasr and Jagielski 2023) {esc(canaries.get("guessing", DECLARED_GUESSING))}. Each row's bound holds at 95% on its own: the verdict reads the "all" row only, and a
row of one kind of canary is exploratory (no correction across the kinds; one of several rows above the claim at 95% each is weaker evidence than "all" above it). The synthetic data is scored by the share of each secret it contains.</p>
<h3>Design</h3>{design}
<h3>Results</h3>{table}
<h3>What to conclude</h3>{_table(["release", "what it is", "conclusion (all canaries)"], verdicts, "")}
{_img(epsilon_figure(canaries), "claimed epsilon and the audited lower bound")}
{_img(loss_drop_figure(canaries), "loss drop of planted and not planted canaries")}"""


def mia_html(section: dict | None) -> str:
    if not section:
        return "<p>No held-out records (<code>audit.holdout_per_client</code>): membership inference needs non-members.</p>"
    rows, figures = [], []
    for key, entry in section.items():
        for name, r in entry["scores"].items():
            rows.append([html.escape(key), f"{entry['members']} / {entry['non_members']}", html.escape(MIA_NAMES.get(name, name)), f"{r['auc']:.3f}{_ci(r.get('auc_ci'))}",
                         tpr_cell(r, "1pct"), tpr_cell(r, "0_1pct")])
    for key in list(section)[:6]:
        figures.append(_img(roc_figure({MIA_NAMES.get(n, n): r for n, r in section[key]["scores"].items()}, f"membership inference: {key}"), f"ROC curves {key}"))
    return _table(["release | client", "members / non-members", "score", "AUC [95% CI]", "TPR at 1% FPR [95% CI]", "TPR at 0.1% FPR [95% CI]"], rows, "") + "".join(figures)


def overlap_html(section: dict | None) -> str:
    rows = [[html.escape(client), str(entry["synthetic"]), str(next(v for k, v in entry.items() if k.startswith("with_a_private")))] for client, entry in (section or {}).items()]
    return _table(["client", "synthetic records", "sharing an 8-word span with its private data (public prompt text excluded)"], rows, "No synthetic data in this run.")


def tpr_cell(result: dict, target: str) -> str:
    """TPR at a target FPR with its interval; below one non-member the target FPR cannot be met
    but by no false positive at all, and the cell says so."""
    cell = f"{result[f'tpr_at_{target}_fpr']:.3f}{_ci(result.get(f'tpr_at_{target}_fpr_ci'))}"
    return cell if result.get(f"tpr_at_{target}_fpr_measurable", True) else f"{cell} (at 0 FPR: too few non-members)"


def _rate(entry: dict) -> str:
    if not entry["tried"]:
        return "n/a"
    return f"{entry['hits']} / {entry['tried']} = {entry['rate']:.3f}{_ci(entry['ci'])}"


def _share(part: dict) -> str:
    return f"{part['replayed']} / {part['records']} = {part['share']:.3f}{_ci(part['ci'])}"


def control_reading(comparison: dict, reference: bool = False) -> str:
    """What a held-out control comparison says, in words (the base model saw neither side: for it a
    difference is chance, or a split that is not the random one it should be)."""
    if reference:
        return "reference: the base model saw neither side" + (" (yet trained ones more often: chance, or a biased split)" if comparison["more_than_held_out"] else "")
    if comparison["more_than_held_out"]:
        return "trained records' values written more often than held-out ones: memorisation"
    return "no more than held-out records' values: no evidence of memorisation at this size"


def control_rows(pii: dict) -> list[tuple[str, dict, bool]]:
    """(who wrote the texts, its comparison, whether it is the reference) for every comparison made."""
    control = pii.get("control") or {}
    rows = [("base model", control.get("base"), True)] + [(name, m.get("control"), False) for name, m in pii.get("models", {}).items()]
    rows.append((f"synthetic data ({pii.get('synthetic_texts', 0)} records)", control.get("synthetic"), False))
    return [(name, comparison, reference) for name, comparison, reference in rows if comparison]


def control_html(pii: dict) -> str:
    """The held-out control: records with a PII value of their own, trained on or held out, replayed."""
    rows = [[html.escape(name), _share(c["trained"]), _share(c["held_out"]), f"{c['difference']:+.3f}{_ci(c['difference_ci'])}", control_reading(c, reference)]
            for name, c, reference in control_rows(pii)]
    empty = ("No held-out control: the run held no records out (audit.holdout_per_client)." if not (pii.get("control") or {}).get("clients")
             else "No held-out control: no trained or no held-out record holds a PII value found nowhere else in the private data.")
    return _table(["written by", "trained records whose value is written", "held-out records whose value is written", "difference [95% CI]", "reading"], rows, empty)


# how `ksg audit --pii-score` ranks the PII candidates, as the report says it
CANDIDATE_SCORES = {"record": "the likelihood of the record from the value to its end", "sentence": "the likelihood of the value and the rest of its sentence",
                    "value": "the likelihood of the value's own tokens"}


def pii_html(pii: dict) -> str:
    esc = html.escape
    found = _table(["type", "values"], [[esc(k), str(v)] for k, v in pii.get("by_type", {}).items()], "No PII found in the private data.")
    summary = (f"<p>{pii['private_pii_values']} distinct PII values in the private data; {pii['replayed_in_synthetic']} of them appear verbatim in the "
               f"{pii['synthetic_texts']} synthetic records.</p>")
    replay_rows = [[esc(name), str(m["replayed"]), str(m["replayed_not_by_base"]), esc(", ".join(f"{k}: {v}" for k, v in m["types_not_by_base"].items()) or "-"),
                    _rate(m["replay_rate"]) if "replay_rate" in m else "n/a"]
                   for name, m in pii.get("models", {}).items() if "replayed" in m]
    if replay_rows and "base_replay_rate" in pii:
        replay_rows.insert(0, ["base model (reference)", str(pii["replayed_by_base"]), "-", "-", f"{_rate(pii['base_replay_rate'])} (any private value)"])
    replay = _table(["release", f"values replayed in {pii.get('samples_per_model', 0)} samples from public prompts", "of them not by the base model", "types not by the base model",
                     "samples that write a value the base model did not [95% CI]"], replay_rows, "No sampling from public prompts.")
    attack_rows = []
    if pii.get("base_attacks"):
        attack_rows.append(["base model (reference)", str(pii["base_attacks"]["spans"]), _rate(pii["base_attacks"]["extraction"]), _rate(pii["base_attacks"]["reconstruction"]),
                            f"{_rate(pii['base_attacks']['inference'])} (chance {_num(pii['base_attacks']['inference']['chance'])})", "-"])
    for name, m in pii.get("models", {}).items():
        if "attacks" in m:
            a = m["attacks"]
            beyond = ", ".join(f"{attack}: {a[attack]['hits_not_by_base']}" for attack in ("extraction", "reconstruction", "inference"))
            attack_rows.append([esc(name), str(a["spans"]), _rate(a["extraction"]), _rate(a["reconstruction"]), f"{_rate(a['inference'])} (chance {_num(a['inference']['chance'])})", beyond])
    attacks = _table(["model", "PII spans attacked", "extraction (text before the span)", "reconstruction (masked record)", "inference (candidates)", "hits the base model did not make"],
                     attack_rows, "No PII span in the training records to attack.")
    scored = CANDIDATE_SCORES[pii.get("candidate_score", "record")]
    return f"""{summary}{found}
<h3>Replay from public prompts</h3>{replay}
<h3>Held-out control</h3>
<p>The records that hold a PII value found in no other record of the private data (any field, any client), split by whether the record was trained on or
held out (the holdout is chosen by content, so either kind is as likely to be written by chance): the share of each whose value the samples (or the
synthetic data) write verbatim. Trained records' values written more often, with the difference's 95% interval (Newcombe) above 0, is memorisation; the
same share is chance. Each row is its own comparison: at 95% each, one of many rows may cross 0 by chance.</p>{control_html(pii)}
<h3>Targeted attacks (Lukas et al. 2023), {pii.get('attack_samples_per_span', 0)} samples per span</h3>
<p>Each attack holds what an outsider with the rest of the record would: the text before the span (extraction) or the whole record with the span masked
(reconstruction from the model's own samples, inference among the true value and others of its type), candidates ranked by {scored}. Rates with 95% Wilson intervals.</p>{attacks}"""


def render_html(report: dict) -> str:
    esc = html.escape
    claimed = _table(["client", "claimed epsilon (per unit, composed over this run's releases)"], [[esc(c), _num(e)] for c, e in report["claimed_epsilon"].items()], "No release counted yet.")
    releases = _table(["release", "what it is"], [[esc(n), esc(d)] for n, d in report.get("releases", {}).items()], "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Audit: {esc(report['spec_name'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:.5em 0 1em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style><script>/* for headless checks: each image says whether it decoded */window.addEventListener("load",()=>document.querySelectorAll("img").forEach(i=>i.dataset.loaded=String(i.complete&&i.naturalWidth>0)))</script></head><body>
<h1>Memorization audit: {esc(report['spec_name'])}</h1>
<p>Run <code>{esc(report['run_dir'])}</code>. The audit uses the clients' own data (canaries, held-out records): it is the data owners' check, and this page stays on their side.</p>
{claimed}
<h2>Releases audited</h2>{releases}
<h2>Training loss of the audited releases</h2>
{training_html(report.get("training"))}
<h2>Canaries</h2>
{canary_html(report.get("canaries"), report.get("training"))}
<h2>Membership inference</h2>
{mia_html(report.get("membership_inference"))}
<h2>Synthetic data: verbatim overlap</h2>
{overlap_html(report.get("synthetic_overlap"))}
<h2>PII</h2>
{pii_html(report.get("pii") or {"private_pii_values": 0, "replayed_in_synthetic": 0, "synthetic_texts": 0})}
</body></html>
"""


def write_audit_report(report: dict, directory: Path) -> tuple[Path, Path]:
    """The audit reads the canaries' secrets and the held-out records: it is the data owners'
    check, and its figures (un-noised statistics of private data) stay on their side."""
    json_path, html_path = directory / "audit_report.json", directory / "audit_report.html"
    write_json(json_path, report)
    write_text(html_path, render_html(report))
    write_json(directory / "sides.json", {json_path.name: "clients", html_path.name: "clients"})
    return json_path, html_path

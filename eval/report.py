"""The audit report: `audit_report.json` and `audit_report.html` (plots embedded), written atomically."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from knowledgesg.fileio import write_json, write_text


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def exposure_figure(section: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = section["targets"]
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], targets.items()):
        planted = [e for e, p in zip(result["exposure"], section["planted_flags"]) if p]
        absent = [e for e, p in zip(result["exposure"], section["planted_flags"]) if not p]
        bins = [x * section["space_log2"] / 20 for x in range(21)]
        ax.hist([planted, absent], bins=bins, label=["planted", "not planted"], color=["#c0392b", "#7f8c8d"])
        ax.axvline(section["space_log2"], color="k", linestyle=":", label="log2 |R| (fully memorized)")
        ax.set(title=f"canary exposure: {name}", xlabel="exposure (bits)", ylabel="canaries")
        ax.legend(fontsize=8)
    return _png(fig)


def roc_figure(section: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not section:
        return None
    keys = list(section)[:4]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, result in section[key]["scores"].items():
            ax.plot(result["fpr"], result["tpr"], label=f"{name} (AUC {result['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":")
        ax.set_title(f"membership inference\n{key}", fontsize=9)
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7)
    return _png(fig)


def epsilon_figure(report: dict) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = report.get("canaries")
    if not section or not section["targets"]:
        return None
    names = list(section["targets"])
    bounds = [section["targets"][n]["one_run"]["epsilon_lower_bound"] for n in names]
    claimed = [section["targets"][n]["claimed"]["epsilon"] for n in names]
    certifiable = section["targets"][names[0]]["one_run"]["largest_certifiable"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar(names, bounds, color="#2980b9", label="empirical lower bound (95%)")
    finite = [(i, c) for i, c in enumerate(claimed) if c is not None and c != float("inf")]
    if finite:
        ax.scatter([i for i, _ in finite], [c for _, c in finite], color="#c0392b", marker="_", s=900, linewidths=3,
                   label=f"claimed epsilon, group of {section['group_size']}")
    ax.axhline(certifiable, color="#7f8c8d", linestyle=":", label=f"largest certifiable with these guesses {certifiable:.2f}")
    ax.set(title=f"epsilon: claimed and audited ({section['client']})", ylabel="epsilon")
    ax.legend(fontsize=8)
    return _png(fig)


def _img(data: str | None, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">' if data else "<p>(nothing to plot)</p>"


def render_html(report: dict) -> str:
    canaries = report.get("canaries")
    rows = []
    if canaries:
        for name, result in canaries["targets"].items():
            x, run = result["extraction"], result["one_run"]
            claimed = result["claimed"]["epsilon"]
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{result['mean_exposure_planted']}</td><td>{result['mean_exposure_not_planted']}</td>"
                        f"<td>{x['greedy_planted']} / {canaries['planted']}</td><td>{x['sampled_planted_canaries_hit']} / {canaries['planted']}</td>"
                        f"<td>{run['correct']} / {run['guesses']}</td><td>{run['epsilon_lower_bound']}</td>"
                        f"<td>{'n/a' if claimed is None else round(claimed, 3)}</td><td>{run['largest_certifiable']}</td></tr>")
    mia_rows = []
    for key, entry in (report.get("membership_inference") or {}).items():
        cells = "".join(f"<td>{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f}</td>" for r in entry["scores"].values())
        mia_rows.append(f"<tr><td>{html.escape(key)}</td><td>{entry['members']} / {entry['non_members']}</td>{cells}</tr>")
    claimed = "".join(f"<li>{html.escape(c)}: {e:.3f}</li>" for c, e in report["claimed_epsilon"].items())
    pii = report.get("pii") or {}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Audit: {html.escape(report['spec_name'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style><script>/* for headless checks: each image says whether it decoded */window.addEventListener("load",()=>document.querySelectorAll("img").forEach(i=>i.dataset.loaded=String(i.complete&&i.naturalWidth>0)))</script></head><body>
<h1>Memorization audit: {html.escape(report['spec_name'])}</h1>
<p>Run <code>{html.escape(report['run_dir'])}</code>. Claimed epsilon per client (composed over the ledger):</p><ul>{claimed}</ul>
<h2>Canaries</h2>
{f"<p>{canaries['count']} canaries in client {html.escape(canaries['client'])}, {canaries['planted']} planted x {canaries['repeats']}; secrets of {canaries['digits']} digits (log2 |R| = {canaries['space_log2']}); exposure by {html.escape(canaries['method'])}.</p>" if canaries else "<p>No canaries in this run's spec (audit.canaries).</p>"}
{f"<p>Each canary is a group of {canaries['group_size']} privacy unit(s) (its {canaries['repeats']} copies): the lower bound certifies the epsilon of such a group at the client's delta, so it is compared with the claimed group epsilon (privacy.accounting.group_epsilon), not the per-record one.</p>" if canaries else ""}
<table><tr><th>model</th><th>mean exposure, planted</th><th>not planted</th><th>greedy extractions</th><th>sampled extractions</th><th>correct guesses</th><th>epsilon lower bound</th><th>claimed epsilon (group)</th><th>largest certifiable</th></tr>{"".join(rows)}</table>
{_img(exposure_figure(canaries), "exposure histograms") if canaries else ""}
{_img(epsilon_figure(report), "claimed epsilon and the empirical lower bound") if canaries else ""}
<h2>Membership inference (AUC / TPR at 1% FPR)</h2>
<table><tr><th>model | client</th><th>members / non-members</th><th>loss</th><th>zlib</th><th>reference</th><th>Min-K%</th><th>Min-K%++</th></tr>{"".join(mia_rows)}</table>
{_img(roc_figure(report.get("membership_inference") or {}), "ROC curves") if report.get("membership_inference") else "<p>No held-out records (audit.holdout_per_client).</p>"}
<h2>Synthetic data and PII</h2>
<pre>{html.escape(str(report.get("synthetic_overlap")))}</pre>
<pre>{html.escape(str(pii))}</pre>
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

"""`ksg privacy-report RUN`: per client, what was released and at what (epsilon, delta).

Everything here is recomputed from the ledger entries that the stages wrote, with the same
accountants; nothing is copied from logs. Writes `privacy_report.json` and `privacy_report.html`
(plots embedded) into the run directory.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from knowledgesg.errors import InputError
from knowledgesg.fileio import write_json, write_text
from knowledgesg.runner import load_run_spec
from privacy.accounting import Epsilons, Mechanism, epsilon_pld, epsilon_prv_or_none, epsilon_rdp
from privacy.ledger import LedgerEntry, composed_total, read_ledger

ASSUMPTIONS = [
    "Poisson sampling: each privacy unit joins each step independently with the stated probability.",
    "The unit of privacy is what the spec says (a record, or all of one user's records); neighbouring data sets differ in one unit.",
    "delta is per client; epsilon is reported by PRV for a release and composed by PLD for a client's total.",
    "The noise comes from torch's seeded Mersenne Twister generator, which is not cryptographically secure.",
    "Generation from a DP adapter is post-processing (free) only because no private record enters a prompt.",
]


class CurvePoint(BaseModel):
    steps: int
    prv: float | None
    rdp: float
    pld: float


class ClientReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str
    unit: str
    delta: float
    private: bool
    releases: list[LedgerEntry]
    total: Epsilons
    cap_epsilon: float | None
    curve: list[CurvePoint]


class PrivacyReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str
    spec_name: str
    target_epsilon: float
    clients: list[ClientReport]
    assumptions: list[str]


def epsilon_curve(mechanism: Mechanism, delta: float, points: int = 5) -> list[CurvePoint]:
    """Epsilon after k steps of a DP-SGD release, by each accountant (PLD on a 10x coarser grid: plot precision)."""
    if mechanism.kind != "poisson_gaussian" or mechanism.steps < 1:
        return []
    marks = sorted({max(1, round(mechanism.steps * i / points)) for i in range(1, points + 1)})
    curve = []
    for k in marks:
        partial = [mechanism.model_copy(update={"steps": k})]
        curve.append(CurvePoint(steps=k, prv=epsilon_prv_or_none(partial, delta), rdp=epsilon_rdp(partial, delta), pld=epsilon_pld(partial, delta, discretization=1e-3)))
    return curve


def build_report(run_dir: Path) -> PrivacyReport:
    spec, _ = load_run_spec(run_dir)
    entries = read_ledger(run_dir, [s.name for s in spec.stages])
    if not entries:
        raise InputError(f"{run_dir}: no releases in the ledger yet (run a stage such as dp_train first)")
    clients = []
    for client_id in dict.fromkeys(e.client_id for e in entries):
        mine = [e for e in entries if e.client_id == client_id]
        delta = mine[0].delta
        curve = next((epsilon_curve(e.mechanism, delta) for e in mine if e.mechanism.kind == "poisson_gaussian"), [])
        clients.append(ClientReport(
            client_id=client_id, unit=mine[0].unit, delta=delta, private=all(e.private for e in mine), releases=mine,
            total=composed_total([e.mechanism for e in mine], delta), cap_epsilon=spec.privacy.cap_epsilon, curve=curve,
        ))
    return PrivacyReport(run_dir=str(run_dir), spec_name=spec.name, target_epsilon=spec.privacy.target_epsilon, clients=clients, assumptions=ASSUMPTIONS)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _figure_png(report: PrivacyReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for client in report.clients:
        if client.curve:
            left.plot([p.steps for p in client.curve], [p.prv if p.prv is not None else p.rdp for p in client.curve], marker="o", label=client.client_id)
    left.set(title="epsilon (PRV) against DP-SGD steps", xlabel="steps", ylabel="epsilon")
    if any(c.curve for c in report.clients):
        left.legend()
    finite = [c for c in report.clients if math.isfinite(c.total.pld)]
    width = 0.25
    for offset, name in enumerate(("prv", "rdp", "pld")):
        values = [getattr(c.releases[0].epsilon, name) or 0.0 for c in finite]
        right.bar([i + (offset - 1) * width for i in range(len(finite))], values, width, label=name.upper())
    right.set_xticks(range(len(finite)), [c.client_id for c in finite])
    right.set(title="first release: the three accountants", ylabel="epsilon")
    if finite:
        right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(report: PrivacyReport) -> str:
    rows = []
    for client in report.clients:
        for entry in client.releases:
            m = entry.mechanism
            flag = "" if entry.private else ' <b style="color:#b00">NOT PRIVATE</b>'
            rows.append(
                f"<tr><td>{html.escape(client.client_id)}</td><td>{html.escape(entry.stage)}</td><td>{html.escape(entry.release)}{flag}</td>"
                f"<td>{m.kind}</td><td>{_fmt(m.sample_rate)}</td><td>{_fmt(m.noise_multiplier)}</td><td>{m.steps}</td>"
                f"<td>{entry.delta:.2e}</td><td>{_fmt(entry.epsilon.prv)}</td><td>{_fmt(entry.epsilon.rdp)}</td><td>{_fmt(entry.epsilon.pld)}</td></tr>"
            )
        cap = "" if client.cap_epsilon is None else f" (cap {client.cap_epsilon:g})"
        rows.append(f'<tr class="total"><td>{html.escape(client.client_id)}</td><td colspan="6">total over {len(client.releases)} release(s), PLD composition{cap}</td>'
                    f"<td>{client.delta:.2e}</td><td>{_fmt(client.total.prv)}</td><td>{_fmt(client.total.rdp)}</td><td><b>{_fmt(client.total.pld)}</b></td></tr>")
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in report.assumptions)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Privacy report: {html.escape(report.spec_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}}tr.total{{background:#eef}}</style></head><body>
<h1>Privacy report: {html.escape(report.spec_name)}</h1>
<p>Run <code>{html.escape(report.run_dir)}</code>; target epsilon {_fmt(report.target_epsilon)}. Every figure is recomputed from the run's ledger.</p>
<table><tr><th>client</th><th>stage</th><th>release</th><th>mechanism</th><th>q</th><th>sigma</th><th>steps</th><th>delta</th><th>eps PRV</th><th>eps RDP</th><th>eps PLD</th></tr>
{"".join(rows)}</table>
<h2>Plots</h2><img alt="epsilon against steps, and the three accountants" src="data:image/png;base64,{_figure_png(report)}">
<h2>Assumptions</h2><ul>{assumptions}</ul></body></html>
"""


def write_report(report: PrivacyReport, run_dir: Path) -> tuple[Path, Path]:
    json_path, html_path = run_dir / "privacy_report.json", run_dir / "privacy_report.html"
    write_json(json_path, report.model_dump(mode="json"))
    write_text(html_path, render_html(report))
    return json_path, html_path

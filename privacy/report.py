"""`ksg privacy-report RUN`: per client, every release ever made from its data, at what (epsilon, delta),
against whom.

Everything is recomputed from ledger entries with the same accountants; nothing is copied from
logs. The releases are the client's own ledger (reruns and other runs over the same data
included) and this run's stage copies. Writes `privacy_report.json` and `privacy_report.html`
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
from knowledgesg.fileio import read_json, sha256_file, write_json, write_text
from knowledgesg.manifest import read_manifest
from knowledgesg.runner import load_run_role, load_run_spec
from privacy.accounting import Epsilons, Mechanism, epsilon_pld, epsilon_prv_or_none, epsilon_rdp
from privacy.ledger import LedgerEntry, client_delta, compose, composed_total, ledger_directory, read_stage_ledgers, run_releases
from privacy.units import UNIT_NAMES

SERVER_SEES_UPDATES = ("each client's noised DP-SGD updates in fedtune; under client-level DP-FedAvg, each client's clipped update "
                       "(each client clips, the server adds the noise)")
SERVER_SEES_SECURE_SUM = ("in fedtune with secure aggregation (SecAgg+), only the sum of each round's updates: under client-level DP-FedAvg "
                          "the sum of the clients' clipped updates before the server adds its noise (each client clips, the server adds the "
                          "noise), never a single client's update while it follows the protocol: a server that does not (its own nodes as a "
                          "client's neighbours, dropouts told to some neighbours and not others) can unmask one, and with fewer than "
                          "reconstruction_threshold colluding clients it cannot")


def threat_model(spec, noised_count: bool) -> list[dict[str, str]]:
    """Who sees what, for this run: what the server sees of the fedtune updates depends on whether
    they went through secure aggregation, and of the clients' sizes on whether they were noised."""
    fedtune = next((stage.params for stage in spec.stages if stage.name == "fedtune"), {})
    updates = SERVER_SEES_UPDATES if fedtune.get("secure_aggregation") in (None, False) else SERVER_SEES_SECURE_SUM
    sizes = "each client's noised unit count (partition.json)" if noised_count else "each client's exact record count (partition.json; privacy.count_noise: 0)"
    return [
        {"party": "data owner (each client)",
         "sees": "its own records, its ledger, its un-noised training logs (loss curves), its audit",
         "protected_by": "(it is the owner)"},
        {"party": "server operator (and anyone holding the spec, the server's files and every other record)",
         "sees": "the spec and seed; every server-side artifact: DP adapters, synthetic data, refine decisions, the final adapter, "
                 f"{sizes}, manifests (client-side files appear only as keyed digests); " + updates,
         "protected_by": "the record-level epsilon of every release whose noise the client drew from OS entropy; NOT the client-level DP-FedAvg figure "
                         "(the server adds that noise itself)"},
        {"party": "anyone with the released models or synthetic data only",
         "sees": "the DP adapters, the final adapter, the synthetic data",
         "protected_by": "the record-level epsilon; with client-level DP-FedAvg also the client-level figure for whole clients"},
    ]


N_NOISED = ("N, the number of privacy units per client, leaves the client only as its noised count N̂ (Gaussian, sensitivity 1, "
            "privacy.count_noise), released once per data set and composed with the other releases; partition.json, q = B/N̂, the steps "
            "and the default delta (at most 1e-5 and 1/(100 N̂), a power of ten) use it. The coins still run over the actual units, each at q.")
N_PUBLIC = ("N, the number of records and privacy units per client, is treated as public (privacy.count_noise: 0): partition.json lists it "
            "(for the client the audit plants canaries in, with the canaries not planted: the mechanism is the same whichever are in), it sets q = B/N, and the default delta (at most 1e-5 and 1/(100 N), a power of ten) depends on its order of magnitude; against "
            "an adversary holding every other record it tells whether the last one is in.")


SAMPLING_AND_UNIT = [
    "Poisson sampling: each privacy unit joins each step independently with the stated probability q; the coins are drawn on the client.",
    "The unit of privacy is stated per release: a record, a source document (all pairs made from one transcript or abstract), or a user; "
    "neighbouring data sets differ in one unit, and a unit contributes at most the stated number of records.",
]
ASSUMPTIONS_AFTER_N = [
    "delta is per client; N x delta is shown so that a delta near 1/N (which would allow publishing a whole unit) is visible.",
    "The noise and the sampling coins of every release come from AES-256-CTR keyed with 32 bytes of OS entropy on the client, drawn "
    "afresh for each release and never stored or sent; each Gaussian value sums four draws (Opacus's floating-point defence). "
    "A release made with privacy.reproducible_noise is NOT PRIVATE: anyone with the spec can regenerate its noise.",
    "A client's total composes (PLD) every record-level release ever recorded for its data, reruns and other runs sharing the ledger "
    "included; a release interrupted after it was recorded is counted even if it was redone.",
    "Generation from a DP adapter is post-processing (free) only because no private record enters a prompt (every prompt sent is kept).",
    "Not protected: how long a stage takes (a timing side channel), and in the single-process simulation (`ksg run` without --role) "
    "one machine holds both sides. Split by role (--role client / --role server), each party holds only its own files; only the "
    "releases cross, checked by the server against the sender's manifest, and a client's failure reaches the server as its kind only.",
]


def assumptions(noised_count: bool) -> list[str]:
    """The report's assumptions; what it says of N depends on whether this run's sizes were noised."""
    return [*SAMPLING_AND_UNIT, N_NOISED if noised_count else N_PUBLIC, *ASSUMPTIONS_AFTER_N]


class CurvePoint(BaseModel):
    steps: int
    prv: float | None
    rdp: float
    pld: float


class ReleaseRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entry: LedgerEntry
    status: str  # where the release stands as seen from this run
    # recomputed from the entry's mechanism (none without a guarantee): the figures an entry
    # stores are, on the server, the client's word
    epsilon: Epsilons


class ClientReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str
    units: list[str]
    num_units: int | None
    count_noise: float | None = None  # sigma of the client's noised count; None: N treated as public
    delta: float
    n_times_delta: float | None
    private: bool
    releases: list[ReleaseRow]
    total: Epsilons  # record-level releases, composed
    client_level: Epsilons | None  # client-level DP-FedAvg, against holders of the final model only
    cap_epsilon: float | None
    curve: list[CurvePoint]


class PrivacyReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str
    spec_name: str
    target_epsilon: float
    ledger_dir: str
    clients: list[ClientReport]
    threat_model: list[dict[str, str]]
    assumptions: list[str]


def epsilon_curve(mechanism: Mechanism, delta: float, points: int = 5) -> list[CurvePoint]:
    """Epsilon after k steps of a DP-SGD release, by each accountant (PLD on its default grid, `pld_grid`)."""
    if mechanism.kind != "poisson_gaussian" or mechanism.steps < 1:
        return []
    marks = sorted({max(1, round(mechanism.steps * i / points)) for i in range(1, points + 1)})
    curve = []
    for k in marks:
        partial = [mechanism.model_copy(update={"steps": k})]
        curve.append(CurvePoint(steps=k, prv=epsilon_prv_or_none(partial, delta), rdp=epsilon_rdp(partial, delta), pld=epsilon_pld(partial, delta)))
    return curve


def release_status(entry: LedgerEntry, run_dir: Path, ours: set[str]) -> str:
    """`ours`: the releases this run's stages made (`releases_made_here`), whichever path the run
    had then: a run directory moved or copied still knows its own releases."""
    if entry.release_id not in ours and Path(entry.run_dir) != run_dir.resolve():
        return f"released by another run ({entry.run_dir})"
    artifact = run_dir / entry.artifact.split("#", 1)[0]
    if entry.artifact_sha256 is None or "#" in entry.artifact:
        return "this run"
    if artifact.is_file() and sha256_file(artifact) == entry.artifact_sha256:
        return "this run, current"
    return "this run, since replaced or removed (still counted)"


def client_report(client_id: str, entries: list[LedgerEntry], run_dir: Path, cap: float | None, count_noise: float | None, ours: set[str]) -> ClientReport:
    """`count_noise`: the sigma of the noised count this run planned the client's releases with (None: N public)."""
    delta = client_delta(entries)
    counted = [e for e in entries if e.counts_against_budget]
    client_level = [e.effective_mechanism() for e in entries if not e.counts_against_budget]
    sizes = [e.num_units for e in counted if e.num_units is not None]
    first_sgd = next((e for e in counted if e.mechanism.kind == "poisson_gaussian"), None)
    return ClientReport(
        client_id=client_id, units=list(dict.fromkeys(UNIT_NAMES.get(e.unit, e.unit) for e in counted)), num_units=sizes[-1] if sizes else None,
        count_noise=count_noise,
        delta=delta, n_times_delta=sizes[-1] * delta if sizes else None, private=all(e.private for e in entries),
        releases=[ReleaseRow(entry=e, status=release_status(e, run_dir, ours), epsilon=compose([e.effective_mechanism()], e.delta)) for e in entries],
        total=composed_total(entries, delta),
        client_level=compose(client_level, next(e.delta for e in entries if not e.counts_against_budget)) if client_level else None,
        cap_epsilon=cap, curve=epsilon_curve(first_sgd.effective_mechanism(), delta) if first_sgd else [],
    )


def releases_made_here(run_dir: Path, stages: list[str], server: bool = False) -> set[str]:
    """Ids of the releases this run's stages made while they ran: a moved or copied run still knows
    them. A stage's ledger.json may also hold one made before it started (a noised count another run
    of the same data drew, reused): that one is not this run's. On a split run's server every
    release in a stage's copy is one this run received: an entry as sent gives its day only, which
    is before the manifest's start, so every one had read "released by another run"."""
    ours = set()
    for stage in stages:
        manifest = read_manifest(run_dir / "stages" / stage)
        if manifest is not None:
            ours |= {e.release_id for e in read_stage_ledgers(run_dir, [stage]) if server or e.released_at >= manifest.started_at}
    return ours


def build_report(run_dir: Path) -> PrivacyReport:
    spec, base_dir = load_run_spec(run_dir)
    ledger_dir = ledger_directory(spec.privacy.ledger_dir, base_dir, run_dir)
    stages = [s.name for s in spec.stages]
    releases = run_releases(run_dir, stages, ledger_dir)
    ours = releases_made_here(run_dir, stages, server=load_run_role(run_dir).kind == "server")
    if not releases:
        raise InputError(f"{run_dir}: no releases in the ledger yet (run a stage such as dp_train first)")
    # whether this run's sizes were noised is partition.json's to say (a shared ledger may hold a count another run drew)
    partition = run_dir / "stages/ingest/partition.json"
    noise = (read_json(partition).get("count") or {}).get("noise_multipliers", {}) if partition.is_file() else {}
    clients = [client_report(client, entries, run_dir, spec.privacy.cap_epsilon, noise.get(client), ours) for client, entries in releases.items()]
    return PrivacyReport(run_dir=str(run_dir), spec_name=spec.name, target_epsilon=spec.privacy.target_epsilon, ledger_dir=str(ledger_dir),
                         clients=clients, threat_model=threat_model(spec, bool(noise)), assumptions=assumptions(bool(noise)))


def size_origin(client: ClientReport) -> str:
    return "public" if client.count_noise is None else f"noised count, sigma {client.count_noise:g}"


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def release_label(entry: LedgerEntry) -> str:
    if entry.private or entry.mechanism.kind == "post_processing":
        return entry.release
    return f"{entry.release} NOT PRIVATE" + (" (reproducible noise)" if entry.noise == "reproducible" else "")


def _figure_png(report: PrivacyReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for client in report.clients:
        if client.curve:
            left.plot([p.steps for p in client.curve], [p.prv if p.prv is not None else p.rdp for p in client.curve], marker="o", label=client.client_id)
    left.set(title="epsilon (PRV) against DP-SGD steps, first release", xlabel="steps", ylabel="epsilon")
    if any(c.curve for c in report.clients):
        left.legend()
    finite = [c for c in report.clients if math.isfinite(c.total.pld)]
    width = 0.25
    for offset, name in enumerate(("prv", "rdp", "pld")):
        values = [getattr(c.total, name) or 0.0 for c in finite]
        right.bar([i + (offset - 1) * width for i in range(len(finite))], values, width, label=name.upper())
    right.set_xticks(range(len(finite)), [c.client_id for c in finite])
    right.set(title="each client's total: the three accountants", ylabel="epsilon")
    if finite:
        right.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(report: PrivacyReport) -> str:
    esc = html.escape
    rows = []
    for client in report.clients:
        for row in client.releases:
            entry, m = row.entry, row.entry.mechanism
            label = esc(release_label(entry)).replace("NOT PRIVATE", '<b style="color:#b00">NOT PRIVATE</b>')
            rows.append(
                f"<tr><td>{esc(client.client_id)}</td><td>{esc(entry.stage)}</td><td>{label}</td><td>{esc(UNIT_NAMES.get(entry.unit, entry.unit))}</td>"
                f"<td>{m.kind}</td><td>{fmt(m.sample_rate)}</td><td>{fmt(m.noise_multiplier)}</td><td>{'-' if m.kind == 'post_processing' else m.steps}</td>"
                f"<td>{entry.delta:.2e}</td><td>{fmt(row.epsilon.prv)}</td><td>{fmt(row.epsilon.rdp)}</td><td>{fmt(row.epsilon.pld)}</td>"
                f"<td>{esc(row.status)}</td><td>{esc(entry.trust)}</td></tr>"
            )
        cap = "" if client.cap_epsilon is None else f"; cap {client.cap_epsilon:g}"
        n = "" if client.num_units is None else f"; N = {client.num_units} ({size_origin(client)}), N x delta = {client.n_times_delta:.2e}"
        rows.append(f'<tr class="total"><td>{esc(client.client_id)}</td><td colspan="7">total over {sum(r.entry.costs_privacy for r in client.releases)} '
                    f"release(s) with a privacy cost, PLD composition; unit {esc(', '.join(client.units))}{n}{cap}</td>"
                    f"<td>{client.delta:.2e}</td><td>{fmt(client.total.prv)}</td><td>{fmt(client.total.rdp)}</td><td><b>{fmt(client.total.pld)}</b></td><td colspan=\"2\"></td></tr>")
        if client.client_level is not None:
            rows.append(f'<tr class="total"><td>{esc(client.client_id)}</td><td colspan="7">client-level DP-FedAvg (unit: client), against holders of the final model only</td>'
                        f"<td>{client.client_level.delta:.2e}</td><td>{fmt(client.client_level.prv)}</td><td>{fmt(client.client_level.rdp)}</td><td>{fmt(client.client_level.pld)}</td><td colspan=\"2\"></td></tr>")
    threat = "".join(f"<tr><td>{esc(t['party'])}</td><td>{esc(t['sees'])}</td><td>{esc(t['protected_by'])}</td></tr>" for t in report.threat_model)
    assumptions = "".join(f"<li>{esc(a)}</li>" for a in report.assumptions)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Privacy report: {esc(report.spec_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}}
td:first-child,td:nth-child(2),td:nth-child(3),td:nth-child(4),td:nth-child(13),td:nth-child(14){{text-align:left}}tr.total{{background:#eef}}
table.threat td,table.threat th{{text-align:left;max-width:40em}}td{{white-space:nowrap}}td:nth-child(3),td:nth-child(13),td:nth-child(14),table.threat td{{white-space:normal}}</style><script>/* for headless checks: each image says whether it decoded */window.addEventListener("load",()=>document.querySelectorAll("img").forEach(i=>i.dataset.loaded=String(i.complete&&i.naturalWidth>0)))</script></head><body>
<h1>Privacy report: {esc(report.spec_name)}</h1>
<p>Run <code>{esc(report.run_dir)}</code>; target epsilon {fmt(report.target_epsilon)}; the clients' ledgers are in <code>{esc(report.ledger_dir)}</code>.
Every figure is recomputed from the ledger entries: every release ever made from each client's data, reruns included.</p>
<table><tr><th>client</th><th>stage</th><th>release</th><th>unit</th><th>mechanism</th><th>q</th><th>sigma</th><th>steps</th><th>delta</th><th>eps PRV</th><th>eps RDP</th><th>eps PLD</th><th>status</th><th>holds against</th></tr>
{"".join(rows)}</table>
<h2>Threat model</h2>
<table class="threat"><tr><th>party</th><th>what it sees</th><th>what protects the data owner from it</th></tr>{threat}</table>
<h2>Plots</h2><img alt="epsilon against steps, and each client's total by the three accountants" src="data:image/png;base64,{_figure_png(report)}">
<h2>Assumptions</h2><ul>{assumptions}</ul></body></html>
"""


def write_report(report: PrivacyReport, run_dir: Path) -> tuple[Path, Path]:
    json_path, html_path = run_dir / "privacy_report.json", run_dir / "privacy_report.html"
    write_json(json_path, report.model_dump(mode="json"))
    write_text(html_path, render_html(report))
    return json_path, html_path

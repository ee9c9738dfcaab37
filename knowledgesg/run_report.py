"""`RUN/report.html`: one page per run. The stage table (with a figure of where the time went),
each client's privacy total, and links to the privacy, audit and evaluation reports and to the
published cards. Rewritten by `ksg run`, `ksg privacy-report`, `ksg eval` and `ksg audit`."""

from __future__ import annotations

import html
import math
from pathlib import Path

from knowledgesg.fileio import write_text
from knowledgesg.status import StageState

REPORT = "report.html"
LINKS = [
    ("privacy_report.html", "Privacy report", "every release of each client's data, (epsilon, delta) by three accountants, the threat model", "ksg privacy-report RUN"),
    ("audit/audit_report.html", "Memorization audit", "canaries, the one-run epsilon lower bound, membership inference, PII replay and attacks", "ksg audit RUN"),
    ("eval/eval_report.html", "Evaluation", "accuracy and macro-F1 of the base model, each DP adapter and the final adapter", "ksg eval RUN"),
    ("stages/publish/final_adapter/README.md", "Model card", "the final adapter with its privacy statement", "the publish stage"),
    ("stages/publish/synthetic_data/README.md", "Dataset card", "the synthetic data with its privacy statement", "the publish stage"),
]


def time_figure(states: list[StageState]) -> str:
    """Stage durations as an inline SVG bar chart (no plotting library needed for one figure)."""
    timed = [(s.name, s.duration_s or 0.0) for s in states]
    longest = max((t for _, t in timed), default=0.0) or 1.0
    bar_height, label_width, width = 22, 130, 420
    bars = []
    for row, (name, seconds) in enumerate(timed):
        y = row * bar_height
        length = width * seconds / longest
        bars.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(name)}</text>'
                    f'<rect x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{bar_height - 6}" fill="#2980b9"/>'
                    f'<text x="{label_width + length + 4:.1f}" y="{y + 15}" font-size="11">{seconds:.1f} s</text>')
    height = bar_height * len(timed) + 4
    return (f'<svg role="img" aria-label="time per stage" width="{label_width + width + 70}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(bars)}</svg>')


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} MiB"


def render(run_dir: Path, spec_name: str, states: list[StageState], privacy: list[tuple[str, float, float, int]]) -> str:
    esc = html.escape
    stage_rows = "".join(
        f"<tr><td>{esc(s.name)}</td><td>{esc(s.state)}</td><td>{'' if s.duration_s is None else f'{s.duration_s:.1f} s'}</td>"
        f"<td>{'-' if s.records is None else s.records}</td><td>{_mib(s.peak_rss_mib)}</td><td>{esc(s.finished_at or '')}</td><td>{esc(s.detail)}</td></tr>"
        for s in states)
    privacy_rows = "".join(
        f"<tr><td>{esc(client)}</td><td>{'NOT PRIVATE' if math.isinf(total) else f'{total:.3f}'}</td><td>{delta:.1e}</td><td>{releases}</td></tr>"
        for client, total, delta, releases in privacy) or '<tr><td colspan="4">no release yet</td></tr>'
    links = []
    for relative, title, what, how in LINKS:
        if (run_dir / relative).is_file():
            links.append(f'<li><a href="{esc(relative)}">{esc(title)}</a>: {esc(what)}</li>')
        else:
            links.append(f"<li>{esc(title)}: not made yet ({esc(how)})</li>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Run: {esc(spec_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Run: {esc(spec_name)}</h1>
<p><code>{esc(str(run_dir))}</code></p>
<h2>Stages</h2>
<table id="stages"><tr><th>stage</th><th>state</th><th>time</th><th>records</th><th>peak memory</th><th>finished</th><th>detail</th></tr>{stage_rows}</table>
<figure>{time_figure(states)}<figcaption>Time per stage (its own run time; cached stages show the time they took when they ran).</figcaption></figure>
<h2>Privacy</h2>
<table id="privacy"><tr><th>client</th><th>epsilon, composed over every release of its data</th><th>delta</th><th>releases with a cost</th></tr>{privacy_rows}</table>
<h2>Reports</h2><ul>{"".join(links)}</ul>
</body></html>
"""


def write_run_report(run_dir: Path, spec_name: str, states: list[StageState], privacy: list[tuple[str, float, float, int]]) -> Path:
    path = run_dir / REPORT
    write_text(path, render(run_dir, spec_name, states, privacy))
    return path

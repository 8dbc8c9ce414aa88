"""The scenario report: ``report.json`` and a self-contained ``report.html`` (no scripts, no CDN).

Per scenario: verdict, story (its light RST rendered: paragraphs, lists, ``literal``, *emphasis*;
scenarios/markup.py), steps (with notes and failures), the expectation next to what was
observed, and an SVG timeline with one lane per machine: coloured bands for the operational
states the verifier reported, red diamonds for failure events, purple dots for revocation notices
the machine accepted, and numbered dashed lines where each step began. The time axis starts at
the first observation (setting up the world before it is not drawn); step numbers that would
overlap move to further rows.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from keytrio.scenarios.markup import first_paragraph, inline_html, to_html
from keytrio.testbed.observe import state_name

COLORS = {
    -1: "#d0d0d0", 0: "#c6dbef", 1: "#9ecae1", 2: "#9ecae1", 3: "#74c476", 4: "#fdd049", 5: "#6baed6",
    6: "#fdae6b", 7: "#e34a33", 8: "#969696", 9: "#b30000", 10: "#bcbddc",
}
LANE, WIDTH = 22, 860
LABEL_W, ROW = 16, 12  # room one step number takes on the axis; height of a row of step numbers

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.pass{color:#1a7f37;font-weight:bold} .fail{color:#b30000;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} pre{white-space:pre-wrap;background:#f8f8f8;padding:.6em;
font-size:12px} .legend span{display:inline-block;margin-right:10px} .sw{display:inline-block;width:12px;
height:12px;margin-right:3px;vertical-align:middle} details{margin:.4em 0}
code{font-size:12px;background:#f3f3f3;padding:0 3px;border-radius:3px} .story{max-width:80ch}
.story p{margin:.4em 0} .nw{white-space:nowrap} .story ul{margin:.3em 0 .3em 1.2em;padding:0} svg{display:block;margin:.6em 0}
"""


def write(directory: Path, suite: dict[str, Any]) -> Path:
    """Write ``report.json`` and ``report.html`` into ``directory``; returns the HTML path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(suite, indent=2))
    page = directory / "report.html"
    page.write_text(render(suite))
    return page


def render(suite: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td class={'pass' if s['passed'] else 'fail'}>{'PASS' if s['passed'] else 'FAIL'}</td>"
        f"<td class=nw><a href='#{e(s['name'])}'>{e(s['name'])}</a></td><td class=nw>{s['seconds']:.1f} s</td>"
        f"<td>{inline_html(first_paragraph(s['story'])) if s.get('story') else e(s['summary'])}</td></tr>"
        for s in suite["scenarios"]
    )
    legend = "".join(f"<span><i class=sw style='background:{c}'></i>{e(state_name(s))}</span>"
                     for s, c in sorted(COLORS.items()) if s not in (1, 2))
    body = "".join(_scenario(s) for s in suite["scenarios"])
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>keytrio scenarios</title>"
        f"<style>{CSS}</style></head><body><h1>keytrio scenarios</h1>"
        f"<p>{suite['passed']} passed, {suite['failed']} failed in {suite['seconds']:.1f} s; seed {suite['seed']}</p>"
        f"<table><tr><th></th><th>scenario</th><th>time</th><th>story</th></tr>{rows}</table>"
        f"<p class=legend>{legend}<span>&#9670; failure event</span><span>&#9679; notice received</span></p>"
        f"{body}</body></html>"
    )


def _scenario(s: dict[str, Any]) -> str:
    e = html.escape
    verdict = "<span class=pass>PASS</span>" if s["passed"] else "<span class=fail>FAIL</span>"
    why = "".join(f"<li>{e(w)}</li>" for w in s["verdict"])
    steps = "".join(
        f"<tr><td>{i + 1}</td><td class={'pass' if st['ok'] else 'fail'}>{'ok' if st['ok'] else 'FAIL'}</td>"
        f"<td>{e(st['title'])}{''.join('<br><small>' + e(n) + '</small>' for n in st['notes'])}"
        f"{'<br><small class=fail>' + e(st['detail']) + '</small>' if st['detail'] else ''}</td>"
        f"<td class=nw>{st['seconds']:.2f} s</td></tr>"
        for i, st in enumerate(s["steps"])
    )
    expected = ""
    if s["expect"] is not None:
        cells = []
        for machine, want in s["expect"].items():
            got = s["observed"]["machines"].get(machine, {})
            cells.append(
                f"<tr><td>{e(machine)}</td><td><code>{e(json.dumps(want))}</code></td>"
                f"<td><code>{e(json.dumps({k: got.get(k) for k in ('state_names', 'events', 'notices')}))}"
                "</code></td></tr>")
        expected = ("<details><summary>expected vs observed</summary><table><tr><th>machine</th>"
                    f"<th>expected</th><th>observed</th></tr>{''.join(cells)}</table></details>")
    return (
        f"<h2 id='{e(s['name'])}'>{verdict} {e(s['name'])} <small>({s['seconds']:.1f} s)</small></h2>"
        f"<div class=story>{to_html(s['story'])}</div>{'<ul>' + why + '</ul>' if why else ''}"
        f"{_timeline(s)}<table><tr><th>#</th><th></th><th>step</th><th>time</th></tr>{steps}</table>{expected}"
    )


def _tick_step(span: float) -> float:
    """A round tick interval giving about 5 to 10 ticks over ``span`` seconds."""
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span / step <= 10:
            return step
    return 1200.0


def _rows(xs: list[float]) -> list[int]:
    """The row of each label at ``xs`` (ascending): the first row where it does not overlap."""
    ends: list[float] = []  # per row: where its last label ends
    rows = []
    for x in xs:
        row = next((r for r, end in enumerate(ends) if x >= end), len(ends))
        if row == len(ends):
            ends.append(x)
        ends[row] = x + LABEL_W
        rows.append(row)
    return rows


def _timeline(s: dict[str, Any]) -> str:
    e = html.escape
    observed = s["observed"]
    machines = sorted(observed["machines"], key=lambda n: (len(n), n))
    timeline = observed["timeline"]
    if not machines or not timeline:
        return ""
    t0 = min(o["t"] for o in timeline)
    last = max(o["t"] for o in timeline)
    end = last + max((last - t0) * 0.03, 0.2)  # the last state shows as a band, not a sliver
    left = 12 + 7 * max(len(m) for m in machines)
    scale = WIDTH / (end - t0)

    def x_of(t: float) -> float:
        return left + (t - t0) * scale

    marks = [o for o in timeline if o["kind"] == "mark"]
    rows = _rows([x_of(o["t"]) for o in marks])
    top = 6 + ROW * (max(rows, default=0) + 1)  # the step numbers' rows, then the lanes
    bottom = top + LANE * len(machines)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + WIDTH + 40}' height='{bottom + 22}' "
             "font-size='11' font-family='sans-serif'>"]
    step = _tick_step(end - t0)
    k = 0
    while k * step <= end - t0 + 1e-9:
        x = x_of(t0 + k * step)
        parts.append(f"<line x1='{x:.1f}' y1='{bottom}' x2='{x:.1f}' y2='{bottom + 4}' stroke='#666'/>"
                     f"<text x='{x:.1f}' y='{bottom + 15}' text-anchor='middle' fill='#444'>{k * step:g} s</text>")
        k += 1
    for i, (o, row) in enumerate(zip(marks, rows, strict=True)):
        x = x_of(o["t"])
        y = 4 + ROW * (row + 1) - 2
        parts.append(f"<g><title>step {i + 1}: {e(o['value'])} (at {o['t'] - t0:.2f} s)</title>"
                     f"<line x1='{x:.1f}' y1='{y + 2}' x2='{x:.1f}' y2='{bottom}' stroke='#999' stroke-dasharray='3,3'/>"
                     f"<text x='{x + 2:.1f}' y='{y}'>{i + 1}</text></g>")
    for lane, machine in enumerate(machines):
        y = top + lane * LANE
        parts.append(f"<text x='4' y='{y + 13}'>{e(machine)}</text>")
        states = [o for o in timeline if o["machine"] == machine and o["kind"] == "state"]
        for i, o in enumerate(states):
            t_end = states[i + 1]["t"] if i + 1 < len(states) else end
            x, w = x_of(o["t"]), max((t_end - o["t"]) * scale, 1.5)
            color = COLORS.get(o["value"], "#eee")
            parts.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{LANE - 6}' fill='{color}'>"
                         f"<title>{e(o['detail'])} from {o['t'] - t0:.2f} s</title></rect>")
        for o in timeline:
            if o["machine"] != machine:
                continue
            x = x_of(o["t"])
            if o["kind"] == "event":
                parts.append(f"<path d='M{x:.1f} {y - 1} l5 9 l-5 9 l-5 -9 z' fill='#b30000' stroke='white'>"
                             f"<title>{e(str(o['value']))} at {o['t'] - t0:.2f} s</title></path>")
            elif o["kind"] == "notice":
                parts.append(f"<circle cx='{x:.1f}' cy='{y + 8}' r='4' fill='#6a3d9a' stroke='white'>"
                             f"<title>notice {e(str(o['value']))} {e(o['detail'])} at "
                             f"{o['t'] - t0:.2f} s</title></circle>")
    parts.append("</svg>")
    return (f"<p><small>Time from the first observation ({t0:.1f} s after the scenario started: "
            "the world was being set up).</small></p>" if t0 >= 0.05 else "") + "".join(parts)

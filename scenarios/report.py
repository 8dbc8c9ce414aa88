"""The scenario report: ``report.json`` and a self-contained ``report.html`` (no scripts, no CDN).

Per scenario: verdict, story, steps (with notes and failures), the expectation next to what was
observed, and an SVG timeline with one lane per machine: coloured bands for the operational
states the verifier reported, red diamonds for failure events, purple dots for revocation notices
the machine accepted, and numbered dashed lines where each step began.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from keytrio.testbed.observe import state_name

COLORS = {
    -1: "#d0d0d0", 0: "#c6dbef", 1: "#9ecae1", 2: "#9ecae1", 3: "#74c476", 4: "#fdd049", 5: "#6baed6",
    6: "#fdae6b", 7: "#e34a33", 8: "#969696", 9: "#b30000", 10: "#bcbddc",
}
LANE, LEFT, WIDTH = 22, 70, 900

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
.pass{color:#1a7f37;font-weight:bold} .fail{color:#b30000;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} pre{white-space:pre-wrap;background:#f8f8f8;padding:.6em;
font-size:12px} .legend span{display:inline-block;margin-right:10px} .sw{display:inline-block;width:12px;
height:12px;margin-right:3px;vertical-align:middle} details{margin:.4em 0} code{font-size:12px}
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
        f"<td><a href='#{e(s['name'])}'>{e(s['name'])}</a></td><td>{s['seconds']:.1f} s</td>"
        f"<td>{e(s['summary'])}</td></tr>"
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
        f"<td>{st['seconds']:.2f} s</td></tr>"
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
        f"<pre>{e(s['story'])}</pre>{'<ul>' + why + '</ul>' if why else ''}"
        f"{_timeline(s)}<table><tr><th>#</th><th></th><th>step</th><th>time</th></tr>{steps}</table>{expected}"
    )


def _timeline(s: dict[str, Any]) -> str:
    observed = s["observed"]
    machines = sorted(observed["machines"], key=lambda n: (len(n), n))
    if not machines:
        return ""
    timeline = observed["timeline"]
    end = max([o["t"] for o in timeline] + [s["seconds"], 0.1])
    scale = WIDTH / end
    height = 30 + LANE * len(machines)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{LEFT + WIDTH + 20}' height='{height + 20}' "
             "font-size='11' font-family='sans-serif'>"]
    marks = [o for o in timeline if o["kind"] == "mark"]
    for i, o in enumerate(marks):
        x = LEFT + o["t"] * scale
        parts.append(f"<g><title>step {i + 1}: {html.escape(o['value'])}</title>"
                     f"<line x1='{x:.1f}' y1='12' x2='{x:.1f}' y2='{height}' stroke='#999' stroke-dasharray='3,3'/>"
                     f"<text x='{x + 2:.1f}' y='10'>{i + 1}</text></g>")
    for lane, machine in enumerate(machines):
        y = 16 + lane * LANE
        parts.append(f"<text x='4' y='{y + 13}'>{html.escape(machine)}</text>")
        states = [o for o in timeline if o["machine"] == machine and o["kind"] == "state"]
        for i, o in enumerate(states):
            t_end = states[i + 1]["t"] if i + 1 < len(states) else end
            x, w = LEFT + o["t"] * scale, max((t_end - o["t"]) * scale, 1.5)
            color = COLORS.get(o["value"], "#eee")
            parts.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{LANE - 6}' fill='{color}'>"
                         f"<title>{html.escape(o['detail'])} from {o['t']:.2f} s</title></rect>")
        for o in timeline:
            if o["machine"] != machine:
                continue
            x = LEFT + o["t"] * scale
            if o["kind"] == "event":
                parts.append(f"<path d='M{x:.1f} {y - 1} l5 9 l-5 9 l-5 -9 z' fill='#b30000' stroke='white'>"
                             f"<title>{html.escape(str(o['value']))} at {o['t']:.2f} s</title></path>")
            elif o["kind"] == "notice":
                parts.append(f"<circle cx='{x:.1f}' cy='{y + 8}' r='4' fill='#6a3d9a' stroke='white'>"
                             f"<title>notice {html.escape(str(o['value']))} {html.escape(o['detail'])} at "
                             f"{o['t']:.2f} s</title></circle>")
    parts.append(f"<text x='{LEFT}' y='{height + 14}'>0 s</text>"
                 f"<text x='{LEFT + WIDTH - 30}' y='{height + 14}'>{end:.1f} s</text></svg>")
    return "".join(parts)

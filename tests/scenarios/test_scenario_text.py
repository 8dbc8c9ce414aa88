"""Readable stories: whole-sentence summaries (one per scenario, all different), their light RST
rendered as safe HTML, and a report timeline that starts at the first observation with step
numbers that do not overlap."""

from __future__ import annotations

import re

import pytest

from keytrio.actors.cli import main
from keytrio.scenarios import markup, report, runner


def test_summaries_are_whole_distinct_sentences() -> None:
    found = runner.discover()
    summaries = {name: sc.summary for name, sc in found.items()}
    for name, text in summaries.items():
        assert text.endswith("."), (name, text)  # a whole sentence, not a line cut mid-way
        assert text == markup.plain(markup.first_paragraph(found[name].story)), name
        assert "``" not in text and "\n" not in text, (name, text)
    assert len(set(summaries.values())) == len(summaries)  # no two scenarios read the same
    mb = [summaries[n] for n in sorted(summaries) if n.startswith("mb-")]
    assert len(mb) == 5 and len(set(mb)) == 5
    # a scenario's own docstring comes first, the shared module story after it
    story = found["mb-secure-boot-off"].story
    assert story.startswith("Measured boot, Secure Boot off:") and "Story (every mb-* scenario):" in story


def test_scenario_list_prints_every_summary_whole(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal wraps, it does not cut
    assert main(["scenario", "list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = " ".join(out.split())
    for name, sc in runner.discover().items():
        assert f"{name} {sc.summary}" in flat


def test_markup_to_html_is_escaped_and_structured() -> None:
    text = """Title: a ``literal <b>`` and `one` and *stress* and **strong**, a -> b.

Story (every x-* case): first line
continued here.
- item ``one``
  continued
- item two
Expected verdict: <script>alert(1)</script> & done."""
    out = markup.to_html(text)
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done." in out
    assert "<code>literal &lt;b&gt;</code>" in out and "<code>one</code>" in out
    assert "<em>stress</em>" in out and "<strong>strong</strong>" in out and "a \u2192 b" in out
    assert "<p><strong>Story (every x-* case):</strong> first line continued here.</p>" in out
    assert "<ul><li>item <code>one</code> continued</li><li>item two</li></ul>" in out
    assert "<p><strong>Expected verdict:</strong> &lt;script&gt;" in out
    assert out.count("<p>") == 3
    assert markup.plain("a ``b`` `c` *d* **e** mb-* f") == "a b c d e mb-* f"


def _suite(timeline: list[dict]) -> dict:
    return {"seed": 1, "seconds": 30.0, "passed": 1, "failed": 0, "scenarios": [{
        "name": "demo", "summary": "Demo.", "story": "Demo: ``x`` *y*.\n\nStory: more.", "passed": True,
        "seconds": 30.0, "steps": [], "verdict": [], "expect": None,
        "observed": {"machines": {"m0": {}, "m10": {}}, "timeline": timeline}}]}


def test_timeline_starts_at_the_first_observation_and_labels_do_not_overlap() -> None:
    timeline = [{"t": 12.0 + 0.01 * i, "machine": "", "kind": "mark", "value": f"step {i}", "detail": ""}
                for i in range(4)]  # four steps within 30 ms: their numbers would sit on each other
    timeline += [{"t": 12.0, "machine": "m0", "kind": "state", "value": 3, "detail": "Get Quote"},
                 {"t": 20.0, "machine": "m10", "kind": "state", "value": 9, "detail": "Invalid Quote"},
                 {"t": 20.0, "machine": "m10", "kind": "event", "value": "pcr_validation.x", "detail": ""}]
    page = report.render(_suite(timeline))
    svg = page[page.index("<svg"):page.index("</svg>")]
    left = 12 + 7 * len("m10")
    lines = [float(x) for x in re.findall(r"<line x1='([\d.]+)' y1='\d+' x2='[\d.]+' y2='\d+' stroke='#999'", svg)]
    assert lines[0] == pytest.approx(left)  # the first step at the axis' start, not 12 s in
    ticks = re.findall(r"<text x='([\d.]+)' y='\d+' text-anchor='middle' fill='#444'>([\d.]+) s</text>", svg)
    assert ticks[0] == (f"{left:.1f}", "0") and ticks[-1][1] == "8"  # 0 s is the first observation
    labels = [(float(x), int(y)) for x, y in re.findall(r"<text x='([\d.]+)' y='(\d+)'>(?:\d+)</text>", svg)]
    assert len(labels) == 4
    for i, (xa, ya) in enumerate(labels):
        for xb, yb in labels[i + 1:]:
            assert ya != yb or abs(xa - xb) >= report.LABEL_W  # no two step numbers overlap
    assert "12.0 s after the scenario started" in page
    # the story is rendered, not shown as RST text
    assert "<p>Demo: <code>x</code> <em>y</em>.</p><p><strong>Story:</strong> more.</p>" in page
    assert "<td>Demo: <code>x</code> <em>y</em>.</td>" in page


def test_rows_reuse_free_space() -> None:
    assert report._rows([0, 5, 10, 20, 40, 41]) == [0, 1, 2, 0, 0, 1]

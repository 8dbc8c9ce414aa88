"""The store's two group-commit lingers as verifier options: ``commit_linger`` (Store.group_linger:
the writes nobody waits for, a pull poll's success record) and ``push_commit_linger``
(Store.urgent_linger: a write a push agent waits for, its 201 and its 202), each "auto" by default
(derived from quote_interval as before they were options), 0 = commit at once.

Configuration: real TOML files, ``KEYTRIO_VERIFIER_*`` environment, the loader's and resolve's
problems. Behaviour: a real Verifier actor built from its Config (SQLite), a software push agent over
HTTPS, time on trio's MockClock (it jumps after 0.3 s of real idleness, so the linger a request
waits shows as exactly that many mock seconds and the real work as none)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from keytrio.actors.common.config import AUTO, ConfigError, env_name
from keytrio.actors.verifier.config import commit_lingers, default_config, load_config, resolve
from tests.actors.verifier.push_support import enrolled, start
from tests.actors.verifier_support import start_verifier, verifier_options

# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("interval,group,urgent", [
    (2.0, 0.25, 0.1),  # the shipped default interval: both capped
    (1.0, 0.125, 0.05),
    (0.4, 0.05, 0.02),
    (0.0, 0.0, 0.0),
])
def test_auto_gives_the_values_derived_before_the_options(interval: float, group: float, urgent: float) -> None:
    cfg = load_config(env={}, overrides={"quote_interval": interval})
    assert cfg.commit_linger == AUTO and cfg.push_commit_linger == AUTO
    assert commit_lingers(cfg) == (min(0.25, interval / 8), min(0.1, interval / 20)) == (group, urgent)


def test_the_default_file_says_auto_and_loads_as_auto(tmp_path: Path) -> None:
    text = default_config()
    doc = tomllib.loads(text)["verifier"]
    assert doc["commit_linger"] == "auto" and doc["push_commit_linger"] == "auto"
    assert "twice per attestation cycle" in text and "auto = min(0.25, quote_interval / 8)" in text
    f = tmp_path / "verifier.toml"
    f.write_text(text)
    assert commit_lingers(load_config(f, env={})) == (0.25, 0.1)


def test_explicit_values_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "verifier.toml"
    f.write_text("[verifier]\ncommit_linger = 0.5\npush_commit_linger = 0\n")
    cfg = load_config(f, env={})
    assert cfg.commit_linger == 0.5 and cfg.push_commit_linger == 0.0
    assert commit_lingers(cfg) == (0.5, 0.0)  # 0 is a value: commit at once, not auto
    assert env_name("verifier", "push_commit_linger") == "KEYTRIO_VERIFIER_PUSH_COMMIT_LINGER"
    env = {"KEYTRIO_VERIFIER_PUSH_COMMIT_LINGER": " 0.03 ", "KEYTRIO_VERIFIER_COMMIT_LINGER": "auto"}
    assert commit_lingers(load_config(f, env=env)) == (0.25, 0.03)  # the environment beats the file
    f.write_text('[verifier]\ncommit_linger = 0\npush_commit_linger = "AUTO"\n')
    assert commit_lingers(load_config(f, env={})) == (0.0, 0.0)  # auto never exceeds commit_linger
    assert commit_lingers(load_config(f, env={"KEYTRIO_VERIFIER_COMMIT_LINGER": "0.04"})) == (0.04, 0.04)
    assert commit_lingers(load_config(env={"KEYTRIO_VERIFIER_COMMIT_LINGER": "2"})) == (2.0, 0.1)


@pytest.mark.parametrize("value,problem", [
    (-0.01, "must be >= 0, not -0.01"),
    (float("nan"), "must be a finite number, not nan"),
    (float("inf"), "must be a finite number, not inf"),
    (10.5, "must be <= 10, not 10.5"),
    ("soon", "must be a number or \"auto\", not 'soon'"),
    (True, 'must be a number or "auto", not True'),
    ([0.1], 'must be a number or "auto", not [0.1]'),
])
def test_bad_values_are_refused_at_load_naming_the_option(value: Any, problem: str) -> None:
    for name in ("commit_linger", "push_commit_linger"):
        with pytest.raises(ConfigError) as err:
            load_config(env={}, overrides={name: value})
        assert err.value.problems == [f"{name}: {problem}"]


def test_bad_values_from_the_file_and_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "verifier.toml"
    f.write_text("[verifier]\ncommit_linger = nan\npush_commit_linger = -inf\n")  # TOML has both
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert err.value.problems == ["commit_linger: must be a finite number, not nan",
                                  "push_commit_linger: must be a finite number, not -inf"]
    with pytest.raises(ConfigError) as err:
        load_config(env={"KEYTRIO_VERIFIER_COMMIT_LINGER": "automatic", "KEYTRIO_VERIFIER_PUSH_COMMIT_LINGER": "1e9"})
    assert err.value.problems == ["commit_linger: must be a number or \"auto\", not 'automatic'",
                                  "push_commit_linger: must be <= 10, not 1000000000.0"]


def test_an_explicit_push_commit_linger_above_commit_linger_is_refused_at_start(tmp_path: Path, pki: Any) -> None:
    def problems(**over: Any) -> list[str]:
        try:
            resolve(load_config(env={}, overrides=verifier_options(pki, tmp_path, **over)))
        except ConfigError as exc:
            return exc.problems
        return []

    # quote_interval 2: commit_linger auto = 0.25
    assert problems(quote_interval=2.0, push_commit_linger=0.3) == [
        "push_commit_linger: must not exceed commit_linger (0.25 s = auto): a push request's commit never "
        "waits longer than the store's group linger, not 0.3"]
    assert problems(quote_interval=2.0, commit_linger=0.05, push_commit_linger=0.06) == [
        "push_commit_linger: must not exceed commit_linger (0.05 s): a push request's commit never "
        "waits longer than the store's group linger, not 0.06"]
    assert problems(quote_interval=2.0, push_commit_linger=0.25) == []  # equal is fine
    assert problems(quote_interval=2.0, commit_linger=0.05) == []  # auto follows commit_linger down
    assert problems(commit_linger=0, push_commit_linger=0) == []


# --- behaviour: the actor built from its Config --------------------------------------------------


async def test_commit_linger_is_the_stores_group_linger_and_a_background_write_waits_it(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", clock=clock.current_time, commit_linger=0.07)
    store = rv.verifier.store
    assert store is not None and store.group_linger == 0.07 and store.urgent_linger == 0.0  # pull: no urgent
    job = store.submit_grouped(lambda conn: 1, nursery)  # a success record's way: the committer lingers
    before = trio.current_time()
    assert await store.collect(job) == 1
    assert trio.current_time() - before == pytest.approx(0.07)
    await rv.stop()


async def test_auto_commit_linger_follows_quote_interval(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    rv = await start_verifier(nursery, pki, tmp_path / "verifier", clock=clock.current_time, quote_interval=0.4)
    assert rv.verifier.store is not None and rv.verifier.store.group_linger == 0.05  # 0.4 / 8
    await rv.stop()


async def push_request_waits(nursery: trio.Nursery, tmp: Path, pki: Any, clock: MockClock,
                             **over: Any) -> tuple[float, float]:
    """Mock seconds the 201 and then the 202 of one push cycle took on a verifier built with ``over``."""
    rv = await start(nursery, tmp, pki, clock, **over)
    a = await enrolled(rv, pki)
    before = trio.current_time()
    caps = await a.post_capabilities()
    assert caps.status_code == 201, caps.text
    after_caps = trio.current_time()
    requested = caps.json()["data"]["attributes"]["evidence_requested"]
    resp = await a.send_evidence(a.evidence(requested))
    assert resp.status_code == 202, resp.text
    assert resp.json()["data"]["attributes"]["evaluation"] == "pass"
    waits = after_caps - before, trio.current_time() - after_caps
    await rv.stop()
    return waits


async def test_a_push_request_waits_the_configured_push_commit_linger(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    # quote_interval 2 (push_support.start): auto would be 0.1 s per request
    caps, evidence = await push_request_waits(nursery, tmp_path / "a", pki, clock, push_commit_linger=0.03)
    assert caps == pytest.approx(0.03) and evidence == pytest.approx(0.03)


async def test_push_commit_linger_0_answers_at_once(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    assert await push_request_waits(nursery, tmp_path / "a", pki, clock, push_commit_linger=0) == (0.0, 0.0)


async def test_auto_push_commit_linger_as_shipped_and_never_above_commit_linger(
    nursery: trio.Nursery, tmp_path: Path, pki: Any, clock: MockClock
) -> None:
    caps, evidence = await push_request_waits(nursery, tmp_path / "a", pki, clock)
    assert caps == pytest.approx(0.1) and evidence == pytest.approx(0.1)  # min(0.1, 2 / 20)
    caps, evidence = await push_request_waits(nursery, tmp_path / "b", pki, clock, commit_linger=0.02)
    assert caps == pytest.approx(0.02) and evidence == pytest.approx(0.02)  # auto: min(0.1, 0.1, 0.02)

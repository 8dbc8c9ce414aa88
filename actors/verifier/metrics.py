"""The verifier's Prometheus metrics (:class:`VerifierMetrics`), shared by the monitors, the
revocation outbox and the actor's gauges; its own module so that none of them imports another for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric

from keytrio.actors.common.metrics import Metrics
from keytrio.actors.verifier import records

if TYPE_CHECKING:
    from keytrio.actors.common.store import Store

#: lines per poll: 0 (caught up), a few (the steady tail), a whole log (first poll, reboot)
IMA_LINE_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)

#: operational state -> the label of the ``agents`` gauge
STATE_NAMES = {
    records.REGISTERED: "registered", records.START: "start", records.SAVED: "saved",
    records.GET_QUOTE: "get_quote", records.GET_QUOTE_RETRY: "get_quote_retry",
    records.PROVIDE_V: "provide_v", records.PROVIDE_V_RETRY: "provide_v_retry", records.FAILED: "failed",
    records.TERMINATED: "terminated", records.INVALID_QUOTE: "invalid_quote",
    records.TENANT_FAILED: "tenant_failed",
}


class VerifierMetrics:
    """The verifier's Prometheus metrics; one per Verifier (own registry, so verifiers count apart).

    ``polls_total{result}``: ok (quote good), failed (quote checks failed), comm_error (unreachable or
    a retryable/non-retryable HTTP status), malformed, error (anything else). ``failures_total``
    counts recorded failure events by ``event_id``. ``store_commits_total{kind}`` and
    ``store_writes_total{kind}``: the store's group commits (:attr:`store`'s counters, read at each
    scrape), groups by what they held (background: writes nobody waits on, the pull monitors' success
    records; urgent: push requests' writes only; mixed: both) and writes by kind; background writes
    per background or mixed group is the mean size of the groups the pull monitors' records went into.
    """

    def __init__(self) -> None:
        m = self.metrics = Metrics("verifier")
        self.agents = m.gauge("agents", "Agents of this verifier_id per operational state.", ("state",))
        self.polls = m.counter("polls_total", "Quote polls (requests to agents) by result.", ("result",))
        self.failures = m.counter("failures_total", "Recorded attestation failures by event id.", ("event_id",))
        self.poll_seconds = m.histogram("poll_seconds", "Latency of one quote poll (request + checks).")
        self.ima_lines = m.counter("ima_lines_total", "IMA measurement list lines received and evaluated.")
        self.ima_lines_per_poll = m.histogram(
            "ima_lines_per_poll", "IMA lines parsed by one poll's evaluation (0 once an agent is caught up).",
            buckets=IMA_LINE_BUCKETS)
        self.policy_parses = m.counter(
            "runtime_policy_parses_total", "Runtime policies parsed (once per distinct policy: at start, upload, "
            "refresh).")
        self.notices = m.counter("notices_total", "Revocation notices created (one per failure).")
        self.deliveries = m.counter(
            "notice_deliveries_total", "Final outcomes of notice deliveries by outcome: delivered, "
            "expired, abandoned.", ("outcome",))
        self.pending = m.gauge("notices_pending", "Notice deliveries still pending (to agents and webhook).")
        # the per-poll children, looked up once (labels() costs a lock and a dict lookup per call)
        self.poll_results = {r: self.polls.labels(r) for r in ("ok", "failed", "comm_error", "malformed", "error")}
        for state in STATE_NAMES.values():  # every state shows, with 0, from the first scrape
            self.agents.labels(state).set(0)
        #: the running verifier's store (set by the actor): its group-commit counters are exported
        self.store: Store | None = None
        m.registry.register(_StoreCounts(self))

    def set_agents(self, counts: dict[int, int]) -> None:
        for state, name in STATE_NAMES.items():
            self.agents.labels(name).set(counts.get(state, 0))


class _StoreCounts:
    """Collector of the store's group-commit counters: plain ints the store adds to per group
    (Store.groups_*, writes_*), read at scrape time, so the hot path pays no Prometheus call."""

    def __init__(self, owner: VerifierMetrics) -> None:
        self._owner = owner
        self._commits = owner.metrics.full_name("store_commits_total")
        self._writes = owner.metrics.full_name("store_writes_total")

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._commits, "", labels=("kind",)),
                CounterMetricFamily(self._writes, "", labels=("kind",))]  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        s = self._owner.store
        commits = CounterMetricFamily(
            self._commits, "Group commits of the store (one transaction and fsync each) by what they held: "
            "background (writes nobody waits on: the pull monitors' success records), urgent (push "
            "requests' writes only), mixed (both).", labels=("kind",))
        writes = CounterMetricFamily(
            self._writes, "Writes committed in the store's group commits by kind: background, urgent.", labels=("kind",))
        commits.add_metric(("background",), s.groups_background if s else 0)
        commits.add_metric(("urgent",), s.groups_urgent if s else 0)
        commits.add_metric(("mixed",), s.groups_mixed if s else 0)
        writes.add_metric(("background",), s.writes_background if s else 0)
        writes.add_metric(("urgent",), s.writes_urgent if s else 0)
        yield commits
        yield writes

"""The verifier's Prometheus metrics (:class:`VerifierMetrics`), shared by the monitors, the
revocation outbox and the actor's gauges; its own module so that none of them imports another for it.
"""

from __future__ import annotations

from keytrio.actors.common.metrics import Metrics
from keytrio.actors.verifier import records

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
    counts recorded failure events by ``event_id``.
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

    def set_agents(self, counts: dict[int, int]) -> None:
        for state, name in STATE_NAMES.items():
            self.agents.labels(name).set(counts.get(state, 0))

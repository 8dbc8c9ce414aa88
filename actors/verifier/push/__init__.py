"""The verifier's push model (API v3.0): agents behind NAT dial in, the verifier never dials out.

* ``sessions.py``: PoP sessions (protocol/pop.py), bearer tokens stored hashed;
* ``attestations.py``: capabilities -> evidence requested (challenge, PCRs, log offsets), evidence
  -> accepted; the cycle's 429/503/403 rules;
* ``verify.py``: the asynchronous verification (the pull monitor's evidence core), failures,
  timeouts, notices through the outbox;
* ``evalstate.py``: per-agent state kept between attestations (parsed enrolment, IMA hook),
  checked against the row on every use;
* ``timer.py``: one trio deadline per agent (``maximum_attestation_interval``), no polling loop;
* ``service.py``: the service the actor owns (nursery, resume at start-up) and the enrolment hooks;
* ``routes.py``: ``/v3[.0]/sessions``, ``/v3[.0]/agents/{id}/attestations[/latest|/{n}]``;
* ``fast.py``: the cycle's POST and PATCH answered without quart's request machinery;
* ``store.py``: the rows (tables ``verifier_push_sessions``, ``verifier_push_attestations``).

The JSON:API documents themselves are protocol/push_wire.py (pure).
"""

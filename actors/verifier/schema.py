"""The verifier's table: one row per enrolled agent.

Enrolment columns hold what the tenant POSTed (texts as sent, so GET can echo them; JSON lists
as JSON text). Status columns are written by the monitor (actors/verifier/attest.py) through
records.py. Timestamps are wall-clock epoch seconds (ints, as upstream reports them); 0 = never.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

agents = sa.Table(
    "verifier_agents",
    metadata,
    sa.Column("agent_id", sa.String(255), primary_key=True),
    # --- enrolment (POST /v2.x/agents/{uuid}) ---
    sa.Column("v", sa.Text, nullable=True),  # base64 of 32 bytes
    sa.Column("ip", sa.String(255), nullable=True),  # NULL: a push agent (it dials us; migration v0004)
    sa.Column("port", sa.Integer, nullable=True),
    sa.Column("tpm_policy", sa.Text, nullable=False),  # JSON text: {"<pcr>": [hex, ...], "mask": "0x…"}
    sa.Column("runtime_policy", sa.Text, nullable=False, default=""),  # base64, may be empty
    sa.Column("runtime_policy_name", sa.String(255), nullable=True),  # a named policy (allowlists)
    # the policy the agent uses when enrolled inline without a name (runtime_policies.checksum);
    # with a name it records the checksum at enrolment only: the name is what is resolved per poll
    sa.Column("runtime_policy_checksum", sa.String(64), nullable=True),
    sa.Column("runtime_policy_key", sa.Text, nullable=True),
    sa.Column("mb_policy", sa.Text, nullable=True),
    sa.Column("mb_policy_name", sa.String(255), nullable=True),
    sa.Column("ima_sign_verification_keys", sa.Text, nullable=True),
    sa.Column("meta_data", sa.Text, nullable=False, default="{}"),
    sa.Column("revocation_key", sa.Text, nullable=True),  # PEM private key, signs notices
    sa.Column("accept_tpm_hash_algs", sa.Text, nullable=False),  # JSON list
    sa.Column("accept_tpm_encryption_algs", sa.Text, nullable=False),  # JSON list
    sa.Column("accept_tpm_signing_algs", sa.Text, nullable=False),  # JSON list
    sa.Column("ak_tpm", sa.Text, nullable=False),  # base64 TPM2B_PUBLIC
    sa.Column("mtls_cert", sa.Text, nullable=True),  # PEM of the agent's server cert (pinned)
    sa.Column("supported_version", sa.String(16), nullable=False),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    # --- status ---
    sa.Column("operational_state", sa.Integer, nullable=False),
    sa.Column("verifier_id", sa.String(255), nullable=False),
    sa.Column("severity_level", sa.Integer, nullable=True),
    sa.Column("last_event_id", sa.String(255), nullable=True),
    sa.Column("attestation_count", sa.Integer, nullable=False, default=0),
    sa.Column("last_received_quote", sa.Integer, nullable=False, default=0),
    sa.Column("last_successful_attestation", sa.Integer, nullable=False, default=0),
    sa.Column("hash_alg", sa.String(32), nullable=False, default=""),
    sa.Column("enc_alg", sa.String(32), nullable=False, default=""),
    sa.Column("sign_alg", sa.String(32), nullable=False, default=""),
    sa.Column("v_delivered", sa.Boolean, nullable=False, default=False),
    # IMA progress: the next measurement-list line to ask for, and PCR 10 replayed so far per
    # bank ({"sha256": hex, ...}) so a partial list continues where the last quote ended
    sa.Column("next_ima_ml_entry", sa.Integer, nullable=False, default=0),
    sa.Column("ima_pcr10", sa.Text, nullable=False, default="{}"),
    sa.Column("boottime", sa.Integer, nullable=True),
    # protocol.ima_eval.ImaProgress.to_json() as JSON text (running PCR 10, count, boot identity,
    # learned keys); written with the poll's success record, None = start at line 0
    sa.Column("ima_progress", sa.Text, nullable=True),
    # the last good quote's TPMS_CLOCK_INFO: {"clock", "resetCount", "restartCount", "safe"}
    sa.Column("tpm_clock_info", sa.Text, nullable=True),
    sa.Index("ix_verifier_agents_verifier_id", "verifier_id"),
)

# One stored copy per distinct runtime policy: the bytes as uploaded (JSON or a DSSE envelope, as
# UTF-8 text), keyed by protocol.runtime_policy checksum (hex SHA-256 of those bytes).
runtime_policies = sa.Table(
    "verifier_runtime_policies",
    metadata,
    sa.Column("checksum", sa.String(64), primary_key=True),
    sa.Column("policy", sa.Text, nullable=False),
    sa.Column("runtime_policy_key", sa.Text, nullable=True),  # the key it was verified with
    sa.Column("created_at", sa.Float, nullable=False),
)

# Named runtime policies (``/v2.x/allowlists/{name}``): name -> checksum (+ what upstream keeps).
allowlists = sa.Table(
    "verifier_allowlists",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("runtime_policy_key", sa.Text, nullable=True),
    sa.Column("tpm_policy", sa.Text, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_verifier_allowlists_checksum", "checksum"),
)

# --- the revocation outbox (notify.Outbox) -------------------------------------------------------
# A notice is stored, with one delivery row per recipient, in the transaction that records the
# failure; deliveries are retried until delivered or the notice expires (revocation_notice_ttl).
notices = sa.Table(
    "verifier_notices",
    metadata,
    sa.Column("notice_id", sa.String(64), primary_key=True),
    sa.Column("verifier_id", sa.String(255), nullable=False),
    sa.Column("agent_id", sa.String(255), nullable=False),  # the failing agent
    sa.Column("event_id", sa.String(255), nullable=False),
    sa.Column("msg", sa.Text, nullable=False),  # the exact signed JSON text
    sa.Column("signature", sa.Text, nullable=False),  # base64, "" when unsigned
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# state: pending -> delivered (2xx) | expired (ttl over) | abandoned (recipient no longer enrolled)
deliveries = sa.Table(
    "verifier_deliveries",
    metadata,
    sa.Column("notice_id", sa.String(64), sa.ForeignKey("verifier_notices.notice_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("recipient", sa.String(255), primary_key=True),  # an agent id or "webhook"
    sa.Column("verifier_id", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),  # wall-clock epoch seconds
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("done_at", sa.Float, nullable=True),
    sa.Index("ix_verifier_deliveries_due", "verifier_id", "state", "next_attempt_at"),
    sa.Index("ix_verifier_deliveries_recipient", "recipient", "state"),
)

# Named measured-boot policies (``/v2.x/mbpolicies/{name}``): the reference state as JSON text.
# An agent enrolled with ``mb_policy_name`` keeps that name and a copy of the text (agents.mb_policy).
mbpolicies = sa.Table(
    "verifier_mbpolicies",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("mb_policy", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# --- push model (API v3.0; actors/verifier/push/) --------------------------------------------------
# PoP sessions: the challenge handed out, and once proven the SHA-256 of the bearer token (never the
# token itself) with its expiry. Expired sessions are deleted when the agent opens a new one.
push_sessions = sa.Table(
    "verifier_push_sessions",
    metadata,
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("agent_id", sa.String(255), nullable=False),
    sa.Column("challenge", sa.String(64), nullable=False),  # base64 of the 16 challenge bytes
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("challenges_expire_at", sa.Float, nullable=False),
    sa.Column("response_received_at", sa.Float, nullable=True),
    sa.Column("token_hash", sa.String(64), nullable=True),  # hex SHA-256 of "{session_id}.{secret}"
    sa.Column("token_expires_at", sa.Float, nullable=True),
    sa.Index("ix_verifier_push_sessions_agent", "agent_id"),
)

# The attestation history of push agents: (agent, index), at most push_attestation_history rows per
# agent (the oldest go). stage: awaiting_evidence -> evaluating_evidence -> verification_complete;
# evaluation: pending | pass | fail; failure_reason: broken_evidence_chain | policy_violation.
push_attestations = sa.Table(
    "verifier_push_attestations",
    metadata,
    sa.Column("agent_id", sa.String(255), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("evaluation", sa.String(16), nullable=False),
    sa.Column("failure_reason", sa.String(32), nullable=True),
    sa.Column("failure_event", sa.String(255), nullable=True),  # the worst failure's event id
    sa.Column("challenge", sa.String(64), nullable=False),  # base64 nonce of the quote
    sa.Column("hash_alg", sa.String(16), nullable=False),
    sa.Column("evidence_requested", sa.Text, nullable=False),  # JSON list
    sa.Column("capabilities", sa.Text, nullable=False),  # JSON list: evidence_supported as sent
    sa.Column("system_info", sa.Text, nullable=False),  # JSON object
    sa.Column("evidence", sa.Text, nullable=True),  # JSON list: evidence_collected as sent
    sa.Column("capabilities_received_at", sa.Float, nullable=False),
    sa.Column("challenges_expire_at", sa.Float, nullable=False),
    sa.Column("evidence_received_at", sa.Float, nullable=True),
    sa.Column("verification_completed_at", sa.Float, nullable=True),
)

# Cluster mode ([verifier] cluster = true, PostgreSQL; actors/verifier/leases.py, migration v0005):
# one lease per (kind, name): kind "agent" (name: agent_id) or "outbox" (name: the verifier_id,
# whose holder delivers the revocation notices). ``epoch`` grows by one at every claim (fencing
# token); ``expires_at`` is wall-clock epoch seconds of the holder. Members: one heartbeat row per
# running verifier instance (who is alive, for the fair share).
leases = sa.Table(
    "verifier_leases",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("verifier_id", sa.String(255), nullable=False),
    sa.Column("holder", sa.String(64), nullable=True),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Index("ix_verifier_leases_group", "verifier_id", "kind"),
)

members = sa.Table(
    "verifier_members",
    metadata,
    sa.Column("instance_id", sa.String(64), primary_key=True),
    sa.Column("verifier_id", sa.String(255), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

"""The registrar's table: one row per agent id.

A row holds the agent's identity (EK, EK cert, AK: fixed once first registered) and its contact
data, plus the *pending* registration while one waits for activation:

* a first registration is a row with ``regcount == 0`` and ``active == False``; activation makes
  it ``regcount == 1, active == True``; a wrong tag or the timeout deletes it;
* a re-registration of an agent that was activated before only fills the ``pending_*`` columns:
  the row stays ``active`` with its activated contact data and ``mtls_cert``, which GET keeps
  answering (tenants and verifiers go on trusting them); activation applies the pending values
  (``regcount + 1``); a wrong tag or the timeout clears them. So a replay of the (public) EK/AK by
  someone without the TPM neither takes the agent over nor hides it for ``activation_timeout``.
  The pending values live in the row, hence in the database: a restart loses none of them.
  ``active`` is therefore exactly ``regcount > 0`` (migration r0002 fixes older rows).

``auth_tag`` is the tag the current activation was accepted with (a retried activation with the
same tag answers 200 again); ``pending_tag`` the tag expected for the pending one. Both are
HMACs of a one-time credential, never logged. Timestamps are wall-clock epoch seconds.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

agents = sa.Table(
    "registrar_agents",
    metadata,
    sa.Column("agent_id", sa.String(255), primary_key=True),
    sa.Column("ek_tpm", sa.Text, nullable=False),  # base64 TPM2B_PUBLIC
    sa.Column("ekcert", sa.Text, nullable=True),  # base64 DER
    sa.Column("aik_tpm", sa.Text, nullable=False),  # base64 TPM2B_PUBLIC
    sa.Column("mtls_cert", sa.Text, nullable=True),
    sa.Column("ip", sa.String(255), nullable=True),
    sa.Column("port", sa.Integer, nullable=True),
    sa.Column("regcount", sa.Integer, nullable=False, default=0),
    sa.Column("active", sa.Boolean, nullable=False, default=False),
    sa.Column("auth_tag", sa.String(128), nullable=True),
    sa.Column("pending_tag", sa.String(128), nullable=True),
    sa.Column("pending_deadline", sa.Float, nullable=True),
    sa.Column("pending_mtls_cert", sa.Text, nullable=True),
    sa.Column("pending_ip", sa.String(255), nullable=True),
    sa.Column("pending_port", sa.Integer, nullable=True),
    sa.Column("registered_at", sa.Float, nullable=False),  # first registration
    sa.Column("activated_at", sa.Float, nullable=True),
    sa.Index("ix_registrar_agents_pending_deadline", "pending_deadline"),
)

"""The agent's push-mode options (API v3.0): ``mode = "push"`` plus how to reach the verifier.

Names follow upstream's push-model agent where they mean the same (``verifier_url``,
``verifier_tls_ca_cert``, ``attestation_interval_seconds``); its backoff options count
milliseconds and give up after ``exponential_backoff_max_retries``, ours count seconds and never
give up (an edge machine must resume by itself after any outage), so they carry other names.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from keytrio.actors.common.config import Option


def _check_verifier_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        return "must be an https:// URL (the agent verifies the verifier's certificate)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must name only scheme, host and port (the agent adds /v3/...)"
    return None


OPTIONS: tuple[Option, ...] = (
    Option("mode", "choice", "pull",
           "pull: serve the verifier's quote requests on ip:port (API v2.x). push: bind no port;\n"
           "register, then open a PoP session with verifier_url and send evidence (API v3.0).",
           choices=("pull", "push")),
    Option("verifier_url", "str", None,
           "push mode: the verifier, e.g. https://verifier.example:8881 (required in push mode).",
           check=_check_verifier_url),
    Option("verifier_tls_ca_cert", "path", None,
           "push mode: PEM CA file that verifies the verifier's server certificate (cv_ca/cacert.crt).\n"
           "The agent presents no client certificate: its TPM proof of possession authenticates it."),
    Option("verifier_timeout", "float", 30.0, "push mode: seconds one request to the verifier may take.",
           minimum=1.0),
    Option("attestation_interval_seconds", "float", 60.0,
           "push mode: seconds between attestations when the verifier names none\n"
           "(it normally does: seconds_to_next_attestation).", minimum=0.0),
    Option("backoff_initial_delay", "float", 2.0,
           "push mode: seconds to wait after a first failed exchange; doubled on each further one.",
           minimum=0.1),
    Option("backoff_max_delay", "float", 300.0,
           "push mode: the cap of that doubling; the agent keeps retrying at this pace.", minimum=0.1),
)


def problems(values: dict[str, object]) -> list[str]:
    """Cross-option checks of push mode (each option alone is checked by its Option)."""
    if values.get("mode") != "push":
        return []
    out = []
    if not values.get("verifier_url"):
        out.append("verifier_url: required when mode = \"push\"")
    if not values.get("verifier_tls_ca_cert"):
        out.append("verifier_tls_ca_cert: required when mode = \"push\" (the CA of the verifier's certificate)")
    if not values.get("registrar_ip"):
        out.append("registrar_ip: required when mode = \"push\" (the verifier trusts the AK the registrar holds)")
    return out

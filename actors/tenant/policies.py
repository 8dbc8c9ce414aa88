"""The verifier's named runtime policies (``/v2.x/allowlists/``): add, update, show, list, delete.

A policy is checked here first with the verifier's own loader (plain JSON or a DSSE envelope,
verified against ``runtime_policy_key`` when one is given), so a bad file is refused before it
is sent.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from keytrio.actors.tenant.context import TenantContext
from keytrio.actors.tenant.errors import Refused, UsageError, VerificationFailed
from keytrio.actors.tenant.mbpolicies import delete_path
from keytrio.protocol import dsse
from keytrio.protocol.errors import ProtocolError
from keytrio.protocol.runtime_policy import RuntimePolicy, load_policy


def check_policy(policy: bytes, key: str | None = None) -> RuntimePolicy:
    """The parsed policy; VerificationFailed for a bad signature, UsageError for a bad policy."""
    try:
        return load_policy(policy, signing_key=key)
    except dsse.DsseError as exc:
        raise VerificationFailed("runtime policy signature", str(exc)) from exc
    except ProtocolError as exc:
        raise UsageError(f"runtime policy: {exc}") from exc


def _body(policy: bytes, key: str | None, tpm_policy: str | None) -> dict[str, Any]:
    check_policy(policy, key)
    return {
        "runtime_policy": base64.b64encode(policy).decode("ascii"),
        "runtime_policy_key": key or "",
        "tpm_policy": tpm_policy or "",
    }


async def add(t: TenantContext, name: str, policy: bytes, *, key: str | None = None, tpm_policy: str | None = None,
              update: bool = False) -> None:
    """POST (new name; 409 if it exists) or PUT (``update``: replace an existing one; 404 if not)."""
    verifier = await t.ready(t.verifier)
    await verifier.call("PUT" if update else "POST", f"/allowlists/{name}", _body(policy, key, tpm_policy),
                        expect=(200, 201))  # upstream: 201


async def show(t: TenantContext, name: str) -> dict[str, Any]:
    """The stored record: ``name``, ``runtime_policy`` (the policy as uploaded, JSON text as
    upstream answers; base64 of it, what keytrio's verifier answered before, is decoded)."""
    verifier = await t.ready(t.verifier)
    res = dict((await verifier.call("GET", f"/allowlists/{name}")).results)
    raw = res.get("runtime_policy")
    if isinstance(raw, str) and not raw.lstrip().startswith("{"):
        try:
            res["runtime_policy"] = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise Refused("verifier", 200, f"runtime policy {name} is neither JSON text nor base64 of it") from exc
    return res


async def list_names(t: TenantContext) -> list[str]:
    verifier = await t.ready(t.verifier)
    res = (await verifier.call("GET", "/allowlists/")).results
    names = res.get("runtimepolicy names", res.get("names"))
    if not isinstance(names, list):
        raise Refused("verifier", 200, "policy list without 'runtimepolicy names'")
    return [n for n in names if isinstance(n, str)]


async def delete(t: TenantContext, name: str) -> None:
    await delete_path(t, f"/allowlists/{name}")  # upstream: 204 without a body

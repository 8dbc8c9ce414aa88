"""Shared by the measured-boot scenarios: machines that boot a rich synthetic UEFI boot
(testbed/boot_log.py) from their first boot on, and the reference state
``keytrio policy create measured-boot`` makes from the good boot's log.

``Machine(boot=GOOD_BOOT)`` (passed through ``run.testbed(machine_options=BOOT_GOOD)``) replays
the good boot into the PCRs and writes its log where the agent reads ``measuredboot_ml_path``;
``machine.reboot(boot=cfg)`` reboots it (agent down, TPM2_Shutdown + swtpm restart: PCRs reset,
resetCount + 1) into another boot.
"""

from __future__ import annotations

import json
from typing import Any

from keytrio.protocol import eventlog_parse, mb_create
from keytrio.scenarios.runner import Expect
from keytrio.testbed import boot_log
from keytrio.testbed.machine import Machine
from keytrio.testbed.world import GET_QUOTE, INVALID_QUOTE

GOOD_BOOT = boot_log.BootConfig()
#: ``run.testbed(..., machine_options=BOOT_GOOD)``: every machine boots the good boot first
BOOT_GOOD: dict[str, Any] = {"boot": GOOD_BOOT}


def good_policy(m: Machine) -> str:
    """The reference state of the good boot, as JSON text (what the tenant sends as mb_policy)."""
    log = eventlog_parse.parse(boot_log.build(m.banks, GOOD_BOOT))
    return json.dumps(mb_create.refstate_from_log(log))


def failing(event: str) -> dict[str, Expect]:
    return {"m0": Expect(events=(event,), notices=(("m0", event),), states=(GET_QUOTE, INVALID_QUOTE),
                         final=INVALID_QUOTE)}

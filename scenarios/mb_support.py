"""Shared by the measured-boot scenarios: booting a machine into a rich synthetic UEFI boot
(testbed/boot_log.py), and the reference state ``keytrio policy create measured-boot`` makes
from the good boot's log.

A testbed machine boots the minimal log by itself; :func:`boot_into` reboots it the way
``Machine.reboot`` does (agent down, TPM2_Shutdown + swtpm restart: PCRs reset, resetCount + 1)
but replays the given :class:`~testbed.boot_log.BootConfig` into the PCRs and writes its log
where the agent reads ``measuredboot_ml_path``, then starts the agent again.
"""

from __future__ import annotations

import json

from actors.agent.tpm import Tpm
from protocol import eventlog, mb_policy
from scenarios.runner import Expect
from testbed import boot_log
from testbed.machine import Machine
from testbed.world import GET_QUOTE, INVALID_QUOTE

GOOD_BOOT = boot_log.BootConfig()


async def boot_into(m: Machine, cfg: boot_log.BootConfig) -> None:
    await m.stop_agent()
    assert m.swtpm is not None
    await m.swtpm.restart()
    m.boot_log_path.write_bytes(boot_log.build(m.banks, cfg))
    async with await Tpm.open(m.swtpm.tcti) as tpm:
        for pcr, digests in boot_log.events(m.banks, cfg):
            await tpm.extend(pcr, digests)
    await m.start_agent()


def good_policy(m: Machine) -> str:
    """The reference state of the good boot, as JSON text (what the tenant sends as mb_policy)."""
    log = eventlog.parse(boot_log.build(m.banks, GOOD_BOOT))
    return json.dumps(mb_policy.refstate_from_log(log))


def failing(event: str) -> dict[str, Expect]:
    return {"m0": Expect(events=(event,), notices=(("m0", event),), states=(GET_QUOTE, INVALID_QUOTE),
                         final=INVALID_QUOTE)}

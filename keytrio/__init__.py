"""keytrio: Keylime-compatible remote attestation on Trio.

Installed, everything lives under this one name: ``keytrio.actors``, ``keytrio.protocol``,
``keytrio.testbed``, ``keytrio.scenarios`` and ``keytrio.deploy`` (systemd units and sample
configurations). The repository keeps them as top-level folders; setup.py maps them here.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("keytrio")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

"""Data only: systemd units and sample configurations (read with importlib.resources)."""

"""How long this process has been running: a cold start's time before the engine is
built (the interpreter and its imports) is the process's age when the build begins."""

from __future__ import annotations

import os
from pathlib import Path


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux: /proc), else None."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    # Field 22 (starttime, in clock ticks after boot); the name in field 2 may hold spaces
    # but ends at the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def format_phases(phases: dict[str, float]) -> str:
    """'load 1.2 s, compile 3.4 s, ...' in the order given."""
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())

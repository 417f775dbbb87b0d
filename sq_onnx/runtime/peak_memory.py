"""Peak resident memory of this process, resettable, so a conversion reports its own peak even when an
earlier one (or anything else) in the same process went higher."""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where that is not possible
    (not Linux, or /proc/self/clear_refs not writable): peak_rss_mb is then the process's whole-life peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident set size in MB since the last reset_peak_rss() (VmHWM), or since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (0 where unknown). ``field="RssAnon"``: its anonymous part only,
    without pages of memory-mapped files (the weights' external data, which the kernel can drop and read
    again): what the conversion itself must have in memory."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

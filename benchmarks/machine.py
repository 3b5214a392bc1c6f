"""What the machine is, and how much of it other processes took while we measured."""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def describe() -> str:
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cores} cores (nproc), CPU {_cpu_model()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds the whole machine spent busy, and those spent by us and our reaped children."""

    busy: float
    total: float
    ours: float

    @classmethod
    def now(cls) -> CpuSample | None:
        """None where /proc/stat is missing (not Linux)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        except OSError:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (int(f) / TICK for f in fields)
        ours = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        busy = user + nice + system + irq + softirq + steal
        return cls(busy=busy, total=busy + idle + iowait, ours=ours)


def others_share(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """The share of the machine's CPU that other processes used between two samples."""
    if before is None or after is None or after.total <= before.total:
        return None
    others = (after.busy - before.busy) - (after.ours - before.ours)
    return max(0.0, others / (after.total - before.total))


def _cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

"""W&B's system metrics in the neutral vocabulary (``trackbridge.native``), so that a
destination files them under its own names: W&B's ``cpu`` is MLflow's
``cpu_utilization_percentage``. Only a measurement with the same meaning and unit is
translated; the others get readable names (``disk./.usageGB`` → ``disk_usage_gigabytes``).

The keys are the ones the wandb SDK's system monitor writes (``wandb-core``), as the
W&B readers pass them on: under ``system/``.
"""

from __future__ import annotations

import re

from trackbridge.native import readable

PREFIX = "system/"

_NAMES = [
    (re.compile(p), n)
    for p, n in (
        (r"cpu", "cpu_utilization_percentage"),
        (r"memory_percent", "system_memory_usage_percentage"),
        (r"disk\./\.usagePercent", "disk_usage_percentage"),
        (r"disk\./\.usageGB", "disk_usage_gigabytes"),
        (r"disk\.(.+)\.usagePercent", "disk_{0}_usage_percentage"),
        (r"disk\.(.+)\.usageGB", "disk_{0}_usage_gigabytes"),
        (r"disk\.in", "disk_read_megabytes"),
        (r"disk\.out", "disk_write_megabytes"),
        (r"disk\.([^.]+)\.in", "disk_{0}_read_megabytes"),
        (r"disk\.([^.]+)\.out", "disk_{0}_write_megabytes"),
        (r"proc\.memory\.rssMB", "process_memory_rss_megabytes"),
        (r"proc\.memory\.availableMB", "system_memory_available_megabytes"),
        (r"proc\.memory\.percent", "process_memory_usage_percentage"),
        (r"proc\.cpu\.threads", "process_cpu_threads"),
        (r"network\.sent", "network_transmit_bytes"),
        (r"network\.recv", "network_receive_bytes"),
        (r"gpu\.(\d+)\.gpu", "gpu_{0}_utilization_percentage"),
        (r"gpu\.(\d+)\.memoryAllocated", "gpu_{0}_memory_usage_percentage"),
        (r"gpu\.(\d+)\.memoryAllocatedBytes", "gpu_{0}_memory_usage_bytes"),
        (r"gpu\.(\d+)\.memory", "gpu_{0}_memory_busy_percentage"),
        (r"gpu\.(\d+)\.powerWatts", "gpu_{0}_power_usage_watts"),
        (r"gpu\.(\d+)\.powerPercent", "gpu_{0}_power_usage_percentage"),
        (r"gpu\.(\d+)\.temp", "gpu_{0}_temperature_celsius"),
    )
]


def neutral_name(key: str) -> str | None:
    """The neutral name of the system metric the W&B readers call ``key``, or None
    for a key that is not a system metric."""
    if not key.startswith(PREFIX):
        return None
    own = key[len(PREFIX) :]
    for pattern, name in _NAMES:
        m = pattern.fullmatch(own)
        if m:
            return name.format(*(readable(g) for g in m.groups()))
    return readable(own)

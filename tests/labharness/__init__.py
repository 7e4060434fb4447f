"""The project's real-libvirt test harness: a private libvirtd 9.0 + QEMU lab (see lab.py)."""

from .bpfstate import AttachedProgram, device_programs, guest_filter
from .host import LabError, detect_virt_type, ensure_packages
from .lab import Lab, down_all_labs, host_leftovers, sweep_stale_labs

__all__ = [
    "AttachedProgram",
    "Lab",
    "LabError",
    "detect_virt_type",
    "device_programs",
    "down_all_labs",
    "ensure_packages",
    "guest_filter",
    "host_leftovers",
    "sweep_stale_labs",
]

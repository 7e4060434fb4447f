"""libvirt-bpfcg: cgroup v2 device filters for libvirt QEMU guests."""

__version__ = "0.1.0"

"""Fixtures for the real libvirtd + QEMU lab (see tests/labharness/)."""

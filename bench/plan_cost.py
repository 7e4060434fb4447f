#!/usr/bin/env python3
"""Cost of planning a 200-device domain, relative to lxml's bare parse of the same bytes.

Both are measured in the same run, alternating, and the medians compared (target: plan
≤ 3× parse). The domain is live XML as libvirt hands it to the hook (aliases, addresses, resolved
backing chains) with a realistic mix: file-backed and block disks, NICs, consoles,
channels, chardevs, inputs, RNGs, USB hostdevs, PCIe root ports and graphics, plus metadata
extras and a full-size qemu.conf (mostly comments, as shipped). Last line:
``plan_cost ratio=R``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lxml import etree  # noqa: E402

from libvirt_bpfcg.config import Config  # noqa: E402
from libvirt_bpfcg.plan import plan_domain  # noqa: E402

NS = "https://libvirt-bpfcg.org/xmlns/extras/1"


def _pci(slot: int) -> str:
    return (f"<address type='pci' domain='0x0000' bus='0x{slot // 32 + 1:02x}' "
            f"slot='0x{slot % 32:02x}' function='0x0'/>")


def build_domain(image_dir: str) -> bytes:
    """Live XML, as libvirt hands it to the hook: aliases, addresses, resolved chains."""
    devices = []
    slot = 0

    def addr() -> str:
        nonlocal slot
        slot += 1
        return _pci(slot)

    for i in range(30):  # qcow2 images: regular files, stat'ed, no rule
        devices.append(f"""<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='{image_dir}/disk{i}.qcow2' index='{i + 1}'/>
      <backingStore/>
      <target dev='vd{i}' bus='virtio'/>
      <alias name='virtio-disk{i}'/>
      {addr()}
    </disk>""")
    for i in range(6):  # block devices: loop nodes
        devices.append(f"""<disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/loop{i % 8}' index='{40 + i}'/>
      <backingStore/>
      <target dev='sd{i}' bus='scsi'/>
      <readonly/>
      <alias name='scsi0-0-0-{i}'/>
      <address type='drive' controller='0' bus='0' target='0' unit='{i}'/>
    </disk>""")
    for i in range(4):
        devices.append(f"""<disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='admin'><secret type='ceph' usage='ceph-secret'/></auth>
      <source protocol='rbd' name='pool/img{i}' index='{50 + i}'>
        <host name='mon1.example.org' port='6789'/>
      </source>
      <target dev='xd{i}' bus='virtio'/>
      <alias name='virtio-disk{40 + i}'/>
      {addr()}
    </disk>""")
    for i in range(40):
        devices.append(f"""<interface type='bridge'>
      <mac address='52:54:00:00:00:{i:02x}'/>
      <source bridge='br0'/>
      <target dev='vnet{i}'/>
      <model type='virtio'/>
      <alias name='net{i}'/>
      {addr()}
    </interface>""")
    for i in range(10):
        devices.append(f"""<serial type='pty'>
      <source path='/dev/pts/{i + 3}'/>
      <target type='isa-serial' port='{i}'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial{i}'/>
    </serial>""")
        devices.append(f"""<console type='pty' tty='/dev/pts/{i + 3}'>
      <source path='/dev/pts/{i + 3}'/>
      <target type='virtio' port='{i}'/>
      <alias name='console{i}'/>
    </console>""")
    for i in range(20):
        devices.append(f"""<channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/7-bench/org.example.{i}'/>
      <target type='virtio' name='org.example.{i}' state='connected'/>
      <alias name='channel{i}'/>
      <address type='virtio-serial' controller='0' bus='0' port='{i + 1}'/>
    </channel>""")
    for i in range(10):
        devices.append(f"""<serial type='dev'>
      <source path='/dev/null'/>
      <target type='isa-serial' port='{10 + i}'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial{10 + i}'/>
    </serial>""")
    for i in range(10):
        devices.append(f"""<input type='{('tablet', 'mouse', 'keyboard')[i % 3]}' bus='usb'>
      <alias name='input{i}'/>
      <address type='usb' bus='0' port='{i + 1}'/>
    </input>""")
    for i in range(10):
        devices.append(f"""<rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <alias name='rng{i}'/>
      {addr()}
    </rng>""")
    for i in range(10):
        devices.append(f"""<hostdev mode='subsystem' type='usb' managed='no'>
      <source startupPolicy='optional'>
        <address bus='1' device='{i + 2}'/>
      </source>
      <alias name='hostdev{i}'/>
      <address type='usb' bus='0' port='{i + 11}'/>
    </hostdev>""")
    for i in range(27):
        devices.append(f"""<controller type='pci' index='{i + 1}' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='{i + 1}' port='0x{i + 16:x}'/>
      <alias name='pci.{i + 1}'/>
      {addr()}
    </controller>""")
    for i in range(5):
        devices.append(f"""<redirdev bus='usb' type='spicevmc'>
      <alias name='redir{i}'/>
      <address type='usb' bus='0' port='{i + 21}'/>
    </redirdev>""")
    devices.append("""<graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>""")
    devices.append(f"""<video>
      <model type='virtio' heads='1' primary='yes'/>
      <alias name='video0'/>
      {addr()}
    </video>""")
    devices.append(f"<sound model='ich9'><alias name='sound0'/>{addr()}</sound>")
    devices.append(f"<memballoon model='virtio'><alias name='balloon0'/>{addr()}</memballoon>")
    devices.append(f"<watchdog model='i6300esb' action='reset'><alias name='watchdog0'/>"
                   f"{addr()}</watchdog>")
    devices.append("""<tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'/>
      <alias name='tpm0'/>
    </tpm>""")
    devices.append(f"<vsock model='virtio'><cid auto='yes' address='3'/><alias name='vsock0'/>"
                   f"{addr()}</vsock>")
    devices.append("<panic model='isa'><address type='isa' iobase='0x505'/></panic>")
    assert len(devices) == 200, len(devices)
    body = "\n    ".join(devices)
    return f"""<domain type='kvm' id='7'>
  <name>bench</name>
  <uuid>00000000-1111-2222-3333-444444444444</uuid>
  <metadata>
    <bpfcg:extras xmlns:bpfcg="{NS}">
      <bpfcg:device path="/dev/null" access="rw"/>
      <bpfcg:rule>c 195:* rw</bpfcg:rule>
      <bpfcg:class access="rw" optional="yes">char-nvidia*</bpfcg:class>
    </bpfcg:extras>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/bench_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {body}
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>
""".encode()


def qemu_conf_text() -> str:
    """Shaped like the shipped qemu.conf (libvirt 9.0: ~1000 lines, ~38 kB, nearly all
    comments, the ACL among them) plus one admin setting."""
    lines = []
    for i in range(950):
        lines.append(f"# comment {i}: #vnc_listen = \"0.0.0.0\"")
    lines.append('vnc_allow_host_audio = 1')
    lines.append('#cgroup_device_acl = [\n#    "/dev/null", "/dev/full", "/dev/zero",\n#]')
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="plan-cost-") as tmp:
        for i in range(30):
            with open(os.path.join(tmp, f"disk{i}.qcow2"), "wb") as handle:
                handle.write(b"QFI\xfb")
        conf = os.path.join(tmp, "qemu.conf")
        with open(conf, "w") as handle:
            handle.write(qemu_conf_text())
        data = build_domain(tmp)
        config = Config(qemu_conf=conf)
        plan = plan_domain(data, config)  # warm up, and check it works
        assert len(plan.devices) > 50, len(plan.devices)
        parse_times, plan_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            etree.fromstring(data)
            parse_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            plan_domain(data, config)
            plan_times.append(time.perf_counter() - start)
        parse = statistics.median(parse_times)
        planned = statistics.median(plan_times)
        print(f"document: {len(data)} bytes of live XML, 200 devices, "
              f"{len(plan.devices)} plan rows, {len(plan.rules)} rules")
        print(f"lxml bare parse: median {parse * 1e6:.0f} us over {args.rounds} rounds")
        print(f"plan_domain:     median {planned * 1e6:.0f} us over {args.rounds} rounds")
        return planned / parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=301)
    args = parser.parse_args()
    ratio = measure(args)
    print(f"plan_cost ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

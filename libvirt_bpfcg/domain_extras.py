"""Per-guest extra devices from the domain's ``<metadata>``, in our own XML namespace.

Format (docs/metadata.md)::

    <metadata>
      <bpfcg:extras xmlns:bpfcg="https://libvirt-bpfcg.org/xmlns/extras/1">
        <bpfcg:device path="/dev/kvmfr0" access="rw"/>
        <bpfcg:rule>c 195:* rw</bpfcg:rule>
        <bpfcg:class access="rw" optional="yes">char-nvidia*</bpfcg:class>
      </bpfcg:extras>
    </metadata>

The container may have any local name (``virsh metadata --key`` picks the prefix, not the
name); its children are matched by local name, in our namespace or in none, because
``virsh metadata --set`` moves only some elements into the namespace. ``access`` is ``r``,
``rw`` (default) or ``rwm``; ``optional="yes"`` makes a missing device a finding instead of a
problem. Anything else is refused with the element's location: a typo in an extra must
not silently grant nothing — or too much.
"""

from __future__ import annotations

from typing import List

from lxml import etree

from .domain import LOOKUP_CLASS, ORIGIN_EXTRA, DeviceRef, Lookup, first_child
from .errors import InputError, RuleError
from .rules import Rule, is_class_name

NAMESPACE = "https://libvirt-bpfcg.org/xmlns/extras/1"
PREFIX = "bpfcg"
ACCESS_CHOICES = ("r", "rw", "rwm")
_NS_TAG = f"{{{NAMESPACE}}}"
_ELEMENTS = ("device", "rule", "class")
_ATTRIBUTES = {"device": {"path", "access", "optional"},
               "rule": {"optional"},
               "class": {"access", "optional"}}


def _local(tag: object) -> str | None:
    """Local name of an element in our namespace or in none; None for anything else."""
    if not isinstance(tag, str):
        return None
    if tag.startswith(_NS_TAG):
        return tag[len(_NS_TAG):]
    if tag.startswith("{"):
        return None
    return tag


def _flag(el: etree._Element, where: str) -> bool:
    value = el.get("optional", "no")
    if value not in ("yes", "no"):
        raise InputError(f"{where}/@optional: use 'yes' or 'no', not {value!r}")
    return value == "yes"


def _access(value: str | None, where: str) -> str:
    access = value if value is not None else "rw"
    if access not in ACCESS_CHOICES:
        raise InputError(f"{where}: access must be r, rw or rwm, not {access!r}")
    return access


def _check_attributes(el: etree._Element, name: str, where: str) -> None:
    for attr in el.attrib:
        if attr not in _ATTRIBUTES[name]:
            raise InputError(f"{where}: unknown attribute {attr!r} on <{PREFIX}:{name}>")


def extras_refs(root: etree._Element) -> List[DeviceRef]:
    """The extra-device references declared in a ``<domain>``'s metadata (maybe none)."""
    metadata = first_child(root, "metadata")
    if metadata is None:
        return []
    refs: List[DeviceRef] = []
    containers = 0
    for child in metadata:
        if not isinstance(child.tag, str) or not child.tag.startswith(_NS_TAG):
            continue  # other applications' metadata (libosinfo, …)
        containers += 1
        name = child.tag[len(_NS_TAG):]
        base = f"metadata/{PREFIX}:{name}[{containers}]"
        if name in _ELEMENTS:
            # An entry placed straight under <metadata> is accepted too.
            _entry(refs, child, name, base)
            continue
        counts = {key: 0 for key in _ELEMENTS}
        for entry in child:
            if not isinstance(entry.tag, str):
                continue
            local = _local(entry.tag)
            if local not in _ELEMENTS:
                raise InputError(f"{base}: unknown element <{entry.tag}>; expected "
                                 f"<{PREFIX}:device>, <{PREFIX}:rule> or <{PREFIX}:class>")
            counts[local] += 1
            _entry(refs, entry, local, f"{base}/{PREFIX}:{local}[{counts[local]}]")
    return refs


def _entry(refs: List[DeviceRef], el: etree._Element, name: str, where: str) -> None:
    _check_attributes(el, name, where)
    optional = _flag(el, where)
    if name == "device":
        path = el.get("path")
        if not path or not path.startswith("/"):
            raise InputError(f"{where}: <{PREFIX}:device> needs an absolute path=, "
                             f"got {path!r}")
        access = _access(el.get("access"), f"{where}/@access")
        refs.append(DeviceRef(f"{where}/@path", "extra-device", access, path=path,
                              required=not optional, origin=ORIGIN_EXTRA,
                              note="extra device from the domain's metadata"))
        return
    text = (el.text or "").strip()
    if name == "rule":
        try:
            rule = Rule.parse(text)
        except RuleError as exc:
            raise InputError(f"{where}: {exc}") from None
        _access(rule.access, where)
        refs.append(DeviceRef(where, "extra-rule", rule.access, rule=rule, required=False,
                              origin=ORIGIN_EXTRA, note="extra rule from the domain's metadata"))
        return
    # name == "class"
    access = _access(el.get("access"), f"{where}/@access")
    if not is_class_name(text) or text in ("char-", "block-"):
        raise InputError(f"{where}: bad device class {text!r}: use char-NAME or block-NAME "
                         "as listed in /proc/devices (globs allowed)")
    refs.append(DeviceRef(where, "extra-class", access,
                          lookup=Lookup(LOOKUP_CLASS, (text,), f"device class {text}"),
                          required=not optional, origin=ORIGIN_EXTRA,
                          note="extra device class from the domain's metadata"))

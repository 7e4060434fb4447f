"""The whole corpus plans; a representative set matches hand-checked expectations.

The corpus lives beside the repository (``<repo>/../shared/corpus``): CI clones the repo
next to ``shared/``. A missing corpus fails the run — it must never pass by skipping.

virt-manager's files are CLI test outputs: besides domain XML they hold virt-install's two
concatenated documents (install, then boot), virt-xml's unified diffs and plain error
text. Concatenated documents are split and each planned; from a diff, the complete device
elements of its "after" side are planned as hotplug snippets; the file itself must then be
refused with one clean InputError (it is not XML).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Tuple

import pytest
from fakesysfs import FakeHost
from lxml import etree

from libvirt_bpfcg.config import Config
from libvirt_bpfcg.domain import DEVICE_TAGS
from libvirt_bpfcg.errors import InputError
from libvirt_bpfcg.plan import Plan, plan_document, plan_domain, plan_snippet
from libvirt_bpfcg.resolve import LOOKUP_FAILED, MISSING, NOT_A_DEVICE, OK, SKIPPED, STATUSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.normpath(os.path.join(ROOT, "..", "shared", "corpus"))
EXPECTED = os.path.join(ROOT, "tests", "data", "plan")

# Roots that are neither a domain nor a device: virt-xml --build-xml of non-device options.
NOT_PLANNABLE_ROOTS = {"cpu", "blkiotune", "idmap"}


def corpus_files() -> List[str]:
    if not os.path.isdir(CORPUS):
        pytest.fail(f"corpus not found at {CORPUS} (expected <repo>/../shared/corpus)")
    files = sorted(glob.glob(os.path.join(CORPUS, "**", "*.xml"), recursive=True))
    assert len(files) > 400, f"only {len(files)} corpus files under {CORPUS}"
    return files


def concatenated_documents(text: str) -> List[str]:
    """virt-install prints the install-time and the boot-time domain one after the other."""
    return re.findall(r"^<domain[ >].*?^</domain>", text, re.DOTALL | re.MULTILINE)


def diff_device_snippets(text: str) -> List[str]:
    """Complete device elements on the "after" side of a virt-xml unified diff."""
    snippets = []
    for hunk in re.split(r"^@@.*$", text, flags=re.MULTILINE):
        after = [line[1:] for line in hunk.splitlines() if line[:1] in (" ", "+")]
        snippets.extend(_complete_elements(after))
    return snippets


def _complete_elements(after: List[str]) -> List[str]:
    snippets = []
    for i, line in enumerate(after):
        match = re.match(r"^(\s*)<([a-z]+)[ >/]", line)
        if not match or match.group(2) not in DEVICE_TAGS or match.group(2) == "memory":
            continue
        indent, tag = match.groups()
        if line.rstrip().endswith("/>"):
            snippets.append(line)
            continue
        for j in range(i + 1, len(after)):
            if after[j].startswith(f"{indent}</{tag}>"):
                snippets.append("\n".join(after[i:j + 1]))
                break
            if after[j].strip() and not after[j].startswith(indent + " "):
                break  # the hunk ends inside the element
    return snippets


def plan_text(text: str, config: Config) -> Tuple[str, List[Plan]]:
    """Plan one corpus file; returns how it was read and the plans made."""
    try:
        root = etree.fromstring(text.encode())
    except etree.XMLSyntaxError:
        root = None
    if root is not None:
        if root.tag == "node":  # the test driver's multi-domain file
            return "node", [plan_domain(etree.tostring(d), config)
                            for d in root.iterchildren("domain")]
        if root.tag in NOT_PLANNABLE_ROOTS:
            with pytest.raises(InputError, match=f"<{root.tag}>"):
                plan_document(text.encode(), config)
            return "refused-root", []
        return "xml", [plan_document(text.encode(), config)]
    documents = concatenated_documents(text)
    if documents:
        return "concatenated", [plan_domain(document, config) for document in documents]
    with pytest.raises(InputError):
        plan_document(text.encode(), config)
    return "not-xml", [plan_snippet(snippet, config) for snippet in diff_device_snippets(text)]


def test_every_corpus_file_plans() -> None:
    config = Config(qemu_conf="/nonexistent/qemu.conf")
    kinds: Dict[str, int] = {}
    plans = 0
    for path in corpus_files():
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            kind, made = plan_text(text, config)
        except InputError as exc:
            pytest.fail(f"{path}: {exc}")
        kinds[kind] = kinds.get(kind, 0) + 1
        for plan in made:
            plans += 1
            for device in plan.devices:
                assert device.status in STATUSES, (path, device)
                assert device.access in ("r", "rw", "rwm"), (path, device)
                assert device.source, (path, device)
            json.dumps(plan.to_json())
    # Every libvirt file is XML; virt-manager contributes all the other kinds.
    assert kinds["xml"] >= 229 and kinds["concatenated"] >= 60, kinds
    assert kinds["node"] == 1 and kinds["refused-root"] == 3, kinds
    assert plans > 450, plans


def test_diff_snippets_are_found() -> None:
    """The diff extraction really feeds snippets (so the not-XML files are exercised)."""
    with open(os.path.join(CORPUS, "virt-manager", "virt-xml-add-disk-basic.xml")) as handle:
        snippets = diff_device_snippets(handle.read())
    assert any("testvol1.img" in snippet for snippet in snippets), snippets


# ---------------------------------------------------------------------------------------
# Hand-checked expected plans


def expected_files() -> List[str]:
    files = sorted(glob.glob(os.path.join(EXPECTED, "*.json")))
    assert len(files) >= 25, files
    return files


def _load(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _plan(expected: dict, fake: FakeHost, **config: object) -> Plan:
    with open(os.path.join(CORPUS, expected["corpus"]), "rb") as handle:
        data = handle.read()
    return plan_document(data, fake.config(**config), fake.host())


def _domain_rows(plan: Plan) -> List[Tuple[str, str | None, str]]:
    return sorted((d.source, d.path, d.access) for d in plan.devices
                  if d.origin != "default-acl")


def _populate(expected: dict, fake: FakeHost) -> None:
    for row in expected["rows"]:
        lookup = row.get("lookup")
        if lookup and "pci" in lookup:
            fake.pci(lookup["pci"], lookup["group"])
        elif lookup and "mdev" in lookup:
            fake.mdev(lookup["mdev"], lookup["group"])
        elif lookup and "scsi" in lookup:
            fake.scsi(lookup["scsi"], lookup["sg"])
        if "node" in row:
            kind, numbers = row["node"].split()
            major, minor = (int(n) for n in numbers.split(":"))
            fake.node(row["path"], kind, major, minor)
        elif row.get("file"):
            fake.file(row["path"], "image")


@pytest.mark.parametrize("path", expected_files(), ids=os.path.basename)
def test_expected_plan_on_empty_host(path: str, tmp_path) -> None:
    """Nothing exists: every reference is still reported, with the right provenance."""
    expected = _load(path)
    fake = FakeHost(str(tmp_path))
    plan = _plan(expected, fake)
    want = sorted((row["source"], None if row.get("lookup") else row["path"], row["access"])
                  for row in expected["rows"])
    assert _domain_rows(plan) == want
    by_source = {(d.source, d.path): d for d in plan.devices}
    blocking = set()
    for row in expected["rows"]:
        device = by_source[(row["source"], None if row.get("lookup") else row["path"])]
        if "skip" in row:
            assert device.status == SKIPPED and row["skip"] in device.reason, device.reason
        elif "gate" in row:
            assert device.status == SKIPPED and row["gate"] in device.reason
        elif "rule" in row:
            assert device.status == OK and str(device.rule) == row["rule"]
        else:
            assert device.status in (MISSING, LOOKUP_FAILED), (device, device.reason)
            assert device.required == row.get("required", True), device
            if device.required:
                blocking.add(row["source"])
    assert {d.source for d in plan.problems} == blocking


@pytest.mark.parametrize("path", expected_files(), ids=os.path.basename)
def test_expected_plan_on_populated_host(path: str, tmp_path) -> None:
    """Every node exists with the numbers chosen: the plan grants exactly node + access."""
    expected = _load(path)
    fake = FakeHost(str(tmp_path))
    _populate(expected, fake)
    plan = _plan(expected, fake)
    assert _domain_rows(plan) == sorted((row["source"], row["path"], row["access"])
                                        for row in expected["rows"])
    by_source = {(d.source, d.path): d for d in plan.devices}
    granted = set()
    for row in expected["rows"]:
        device = by_source[(row["source"], row["path"])]
        if "skip" in row or "gate" in row:
            assert device.status == SKIPPED, device
        elif "rule" in row:
            assert device.status == OK and str(device.rule) == row["rule"]
            granted.add(row["rule"])
        elif row.get("file"):
            assert device.status == NOT_A_DEVICE and device.rule is None, device
        else:
            rule = f"{row['node']} {row['access']}"
            assert device.status == OK and str(device.rule) == rule, (device, device.reason)
            granted.add(rule)
    domain_rules = {str(d.rule) for d in plan.devices if d.grants and d.origin == "domain"}
    assert domain_rules == granted
    assert plan.problems == []


def test_sound_gate_opens_with_qemu_conf(tmp_path) -> None:
    expected = _load(os.path.join(EXPECTED, "sound-device.json"))
    fake = FakeHost(str(tmp_path))
    with open(os.path.join(str(tmp_path), "qemu.conf"), "w") as handle:
        handle.write("nographics_allow_host_audio = 1\n")
    plan = _plan(expected, fake)
    sound = [d for d in plan.devices if d.kind == "sound"]
    assert [(d.status, str(d.rule)) for d in sound] == [(OK, "c 116:* rw")]
    assert "c 116:* rw" in plan.rule_list()

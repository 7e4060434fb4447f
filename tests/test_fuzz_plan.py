"""Hostile domain XML through ``plan_domain`` (issue 7, part 3).

Generated documents (stress/xmlgen.py: mutated corpus devices, hostile values, byte-level
mutations) — a few thousand here, 100,000 under ``python -m stress`` — and every fixed
hostile document (XXE, billion laughs, 50 MB, deep nesting, device nodes outside /dev with
/dev/mem's numbers, symlink loops …). For each:

* only :class:`~libvirt_bpfcg.errors.BpfcgError` may escape, with a one-line message;
* a plan never grants ``c 1:1`` (/dev/mem), ``c 1:2`` or ``c 1:4`` — not by path, not
  through a symlink, not from a node elsewhere with those numbers, not by a wildcard
  rule —, and a row that resolved to those numbers is marked forbidden.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Dict

import pytest
from engine_helpers import record, scaled
from hypothesis import HealthCheck, Phase, given, settings

from libvirt_bpfcg.config import Config
from libvirt_bpfcg.domain import ORIGIN_ACL
from libvirt_bpfcg.errors import BpfcgError
from libvirt_bpfcg.plan import Plan, plan_domain
from libvirt_bpfcg.resolve import FORBIDDEN, OK
from libvirt_bpfcg.rules import Rule
from stress import xmlgen

TEMPLATES = xmlgen.load_templates()
CONFIG = Config(libvirt_version="9.0.0", qemu_conf="/nonexistent/qemu.conf")
FUZZ_SETTINGS = settings(
    max_examples=scaled(1500, 100_000), deadline=None, database=None,
    phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def hostile_paths(tmp_path_factory) -> Dict[str, str]:
    return xmlgen.make_hostile_nodes(str(tmp_path_factory.mktemp("hostile")))


def dangerous(rule: Rule) -> bool:
    """Would this rule let the guest open /dev/mem, /dev/kmem or /dev/port?"""
    return rule.type in ("c", "a") and any(
        rule.major in (None, major) and rule.minor in (None, minor)
        for major, minor in xmlgen.FORBIDDEN_NUMBERS)


def check_plan(document: bytes, paths: Dict[str, str]) -> str:
    """Plan one document; assert the properties; return the outcome for the statistics."""
    try:
        plan = plan_domain(document, CONFIG)
    except BpfcgError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        return f"refused ({type(exc).__name__})"
    check_guardrails(plan, paths)
    return "planned with problems" if plan.problems else "planned"


def check_guardrails(plan: Plan, paths: Dict[str, str]) -> None:
    for rule in plan.rules:
        assert not dangerous(rule), f"plan grants {rule}"
    aliases = {paths[k] for k in ("mem", "kmem", "port", "link-to-mem")}
    for dev in plan.devices:
        if dev.rule is not None and dangerous(dev.rule) and dev.origin != ORIGIN_ACL:
            assert dev.status == FORBIDDEN, dev
        if dev.path in aliases:
            assert dev.status != OK, dev


def test_fuzzed_documents(hostile_paths):
    outcomes: Counter = Counter()
    started = time.monotonic()
    strategy = xmlgen.domain_documents(TEMPLATES, sorted(hostile_paths.values()))

    @FUZZ_SETTINGS
    @given(strategy)
    def one(document: bytes) -> None:
        outcomes[check_plan(document, hostile_paths)] += 1

    one()
    total = sum(outcomes.values())
    record("fuzz: generated domain XML through plan_domain", total,
           "only BpfcgError escaped, one-line messages; no plan grants c 1:1/1:2/1:4",
           time.monotonic() - started, **dict(outcomes))
    assert outcomes["planned"] + outcomes["planned with problems"] > total // 10, outcomes


def test_fixed_hostile_documents(hostile_paths):
    started = time.monotonic()
    outcomes = {}
    for name, make in xmlgen.hostile_documents(hostile_paths):
        try:
            outcomes[name] = check_plan(make(), hostile_paths)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    record("fuzz: fixed hostile documents through plan_domain", len(outcomes),
           "clean errors or safe plans", time.monotonic() - started)
    # What must be refused outright, and what must plan but never grant the node.
    for name in ("xxe-file", "xxe-http", "xxe-parameter", "external-dtd", "billion-laughs",
                 "quadratic-blowup", "50MB-devices", "50MB-comment", "70MB-stdin",
                 "deep-nesting", "nul-byte", "empty", "doctype-in-comment", "truncated"):
        assert outcomes[name].startswith("refused"), (name, outcomes[name])
    # Nodes with /dev/mem's numbers anywhere are forbidden (a problem: the start is
    # refused); capabilities hostdevs are LXC-only, QEMU never gets a rule for them.
    for key in ("mem", "kmem", "port", "link-to-mem"):
        for kind in ("serial", "disk", "extra-device"):
            assert outcomes[f"{kind}-{key}"] == "planned with problems", (kind, key)
    for key in ("loop", "self-loop", "through-loop", "long-chain"):
        for kind in ("serial", "disk", "extra-device"):  # required, and cannot be looked up
            assert outcomes[f"{kind}-{key}"] == "planned with problems", (kind, key)
    assert outcomes["rule-extras-mem"] == "planned with problems"

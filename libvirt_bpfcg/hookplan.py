"""The domain plan as the hook needs it: refuse on problems, keep only what install uses."""

from __future__ import annotations

import time
from typing import Dict, List

from .config import Config
from .domain import ORIGIN_EXTRA, domain_info
from .errors import InputError
from .hook import DomainPlan
from .plan import Plan, plan_domain
from .xmlsafe import parse_xml


def problems_line(name: str, plan: Plan) -> str:
    """All blocking findings in one line: it becomes libvirt's error message."""
    parts = []
    for dev in plan.problems:
        where = f"{dev.source} ({dev.path})" if dev.path else dev.source
        parts.append(f"{where}: {dev.status}: {dev.reason}")
    return f"domain {name}: refusing to start: " + "; ".join(parts)


def plan_for_hook(xml: bytes, config: Config, name: str) -> DomainPlan:
    plan = plan_domain(xml, config)
    if plan.problems:
        raise InputError(problems_line(name, plan))
    info = plan.domain
    if info is None or not info.uuid:
        raise InputError(f"domain {name}: the domain XML has no <uuid>")
    nodes: List[Dict[str, str]] = []
    for dev in plan.devices:
        rule = dev.rule
        if (dev.origin == ORIGIN_EXTRA and dev.grants and dev.path and rule is not None
                and rule.major is not None and rule.minor is not None):
            nodes.append({"path": dev.path, "rule": str(rule)})
    warnings = [f"{a} and {b} share one map key; only the access both ask for is allowed"
                for a, b in plan.conflicts]
    return DomainPlan(
        name=info.name or name, uuid=info.uuid, rules=plan.rule_list(),
        extra_rules=[str(r) for r in plan.extra_rules], extra_nodes=nodes,
        warnings=warnings, planned_at=time.time())


def uuid_of(xml: bytes) -> str:
    info = domain_info(parse_xml(xml, "domain XML"))
    if not info.uuid:
        raise InputError("the domain XML has no <uuid>")
    return info.uuid

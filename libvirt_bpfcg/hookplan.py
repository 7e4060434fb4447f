"""The domain plan as the hook needs it: refuse on problems, keep only what install uses."""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

from .config import Config
from .domain import ORIGIN_EXTRA
from .errors import InputError
from .hook import DomainPlan
from .plan import Plan, plan_domain


def plan_for_hook(xml: bytes, config: Config, name: str,
                  refuse_problems: bool = True) -> Tuple[DomainPlan, Plan]:
    """Plan for the hook: what it keeps (DomainPlan) and the full plan (for reconcile).
    With ``refuse_problems`` (guest not running yet) blocking findings raise one line that
    becomes libvirt's error; without (reconnect: the guest runs) they are warnings and the
    rules that did resolve are still installed."""
    plan = plan_domain(xml, config)
    warnings = []
    if plan.problems:
        if refuse_problems:
            raise InputError(f"domain {name}: refusing to start: {plan.problem_text()}")
        warnings.append(f"not granted: {plan.problem_text()}")
    info = plan.domain
    if info is None or not info.uuid:
        raise InputError(f"domain {name}: the domain XML has no <uuid>")
    nodes: List[Dict[str, str]] = []
    for dev in plan.devices:
        rule = dev.rule
        if (dev.origin == ORIGIN_EXTRA and dev.grants and dev.path and rule is not None
                and rule.major is not None and rule.minor is not None):
            nodes.append({"path": dev.path, "rule": str(rule)})
    warnings += [f"{a} and {b} share one map key; only the access both ask for is allowed"
                 for a, b in plan.conflicts]
    kept = DomainPlan(
        name=info.name or name, uuid=info.uuid, rules=plan.rule_list(),
        extra_rules=[str(r) for r in plan.extra_rules], extra_nodes=nodes,
        warnings=warnings, planned_at=time.time())
    return kept, plan

"""`exai scale N`: start or stop instances so that N run, parking the sessions of those that stop."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from common.fleet.admin_client import AdminUnavailable, evict_instance
from common.fleet.launch import wait_registered
from common.fleet.registry import busy_instances, control_keys
from common.fleet.services import admin_token, services_for
from common.fleet.supervisor import (
    SupervisorControl,
    plan_scale,
)
from common.keys import Keys
from common.settings import Settings


@dataclass
class ScaleReport:
    """What `exai scale` did: processes started and stopped, sessions parked, calls cut."""

    started: list[str]
    stopped: list[str]
    parked: list[str]
    cut: list[dict[str, str]]
    problems: list[str]


def scale(
    settings: Settings, ctl: SupervisorControl, target: int, *, wait: float | None = None
) -> ScaleReport:
    """Start or stop instances so that `target` run.

    Before an instance stops, the router parks the sessions it serves (waiting up to `wait`
    seconds, default EXAI_DRAIN_TIMEOUT, for their calls in flight, then cutting them with an
    error that says so); they continue on the remaining instances. `target` also becomes the
    ceiling for spares the router starts on demand, so a returning session cannot undo it.
    """
    if target < 0:
        raise ConfigError("the instance count must be 0 or more")
    if target > settings.max_instances:
        raise ConfigError(
            f"cannot scale to {target}: EXAI_MAX_INSTANCES is {settings.max_instances}.",
            hint="Raise EXAI_MAX_INSTANCES and run `exai down` then `exai up` to provision more.",
        )

    redis_url = services_for(settings).redis_url
    prefix = settings.redis_prefix
    wait = settings.drain_timeout if wait is None else wait
    infos = ctl.processes()
    busy: set[str] = set()
    if target < sum(1 for p in infos if p.active and p.instance_num is not None):
        busy = busy_instances(redis_url, prefix, settings.instance_advertise)
    plan = plan_scale(infos, target, busy)
    report = ScaleReport(list(plan.start), list(plan.stop), [], [], [])

    def cap_and_undrain(r: Any, keys: Keys) -> None:
        r.set(keys.instance_cap(), str(target))
        if plan.start:
            r.srem(keys.draining(), *plan.start)  # a stopped instance comes back able to serve

    if (err := control_keys(redis_url, prefix, cap_and_undrain)) is not None:
        report.problems.append(f"could not record the instance ceiling in Redis ({err})")
    for name in plan.start:
        ctl.start(name, wait=False)
    if plan.stop:
        token = admin_token(settings)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(plan.stop)) as pool:
            futures = {name: pool.submit(evict_instance, settings, token, name, wait) for name in plan.stop}
        for name, fut in futures.items():
            try:
                result = fut.result()
            except AdminUnavailable as exc:
                report.problems.append(f"{name}: sessions not parked, router unreachable ({exc.message})")
                continue
            report.parked += result.get("parked", [])
            report.cut += result.get("cut", [])
        for name in plan.stop:
            ctl.stop(name, wait=False)
        ctl.wait_stopped(plan.stop)
        control_keys(redis_url, prefix, lambda r, keys: r.srem(keys.draining(), *plan.stop))
    if plan.start:
        ctl.wait_running(plan.start)
        wait_registered(redis_url, prefix, plan.start, ctl, host=settings.instance_advertise)
    return report

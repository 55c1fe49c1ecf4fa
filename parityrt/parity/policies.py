"""Numerics policies for parity work: presets by name, binding (local or real TP), and hybrids that take some
modules' settings from another policy.

A hybrid is the base policy plus one exact-name override per module whose settings come from the donor, with the
donor's *resolved* settings for that module. So "A with the experts of B" runs the experts exactly as B would
(B's per-layer overrides included) and every other module exactly as A would; bind() then proves each override
names a real module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from torch import nn

from parityrt.config import CONF_DIR, ParallelConfig, RunConfig, compose_run, to_run_config
from parityrt.numerics import OP_KINDS, LayerOverride, NumericsPolicy, bind, to_jsonable, with_ops
from parityrt.tp_runner import TPDriver


def group_options(group: str = "numerics") -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose_option(group: str, name: str) -> RunConfig:
    """conf/config.yaml with `group=name`, composed as Hydra composes it, inside a running Hydra app or outside one."""
    if name not in group_options(group):
        raise ValueError(f"unknown {group} option {name!r}; known: {group_options(group)}")
    try:
        if GlobalHydra.instance().is_initialized():  # inside @hydra.main: compose through the app's own conf/
            return to_run_config(compose(config_name="config", overrides=[f"{group}={name}"]))
        return compose_run([f"{group}={name}"])
    except HydraException as e:
        raise ValueError(f"{group} option {name!r} does not compose: {e}") from None


def preset(name: str, ops: dict[str, dict] | None = None) -> NumericsPolicy:
    """conf/numerics/<name>.yaml, optionally with some knobs changed (e.g. ops={"experts": {"combine": "fp32_sum"}})."""
    policy = _compose_option("numerics", name).numerics
    return with_ops(policy, **ops) if ops else policy


def parallel_preset(name: str) -> ParallelConfig:
    """conf/parallel/<name>.yaml (tp1, vtp4, ...)."""
    return _compose_option("parallel", name).parallel


def bind_policy(model: nn.Module | TPDriver, policy: NumericsPolicy) -> dict[str, dict[str, Any]]:
    """bind() that also reaches the other ranks of a real tensor-parallel model (its driver forwards the policy)."""
    return model.bind(policy) if isinstance(model, TPDriver) else bind(model, policy)


def module_ops(model: nn.Module) -> dict[str, str]:
    """{module name: op kind} for every numerics-aware module, in model order."""
    return {name: m.numerics_op for name, m in model.named_modules() if getattr(m, "numerics_op", None) is not None}


def differing(base: NumericsPolicy, donor: NumericsPolicy, modules: dict[str, str]) -> dict[str, str]:
    """The subset of `modules` whose resolved settings differ between the two policies."""
    return {name: op for name, op in modules.items() if base.resolve(op, name) != donor.resolve(op, name)}


def hybrid(base: NumericsPolicy, donor: NumericsPolicy, modules: dict[str, str], name: str) -> NumericsPolicy:
    """`base`, except that the given modules (name -> op kind) run with the donor's settings."""
    # module names hold only [A-Za-z0-9_.], so each name is an fnmatch pattern that matches itself and nothing else
    overrides = [LayerOverride(pattern=fqn, op=op, set=to_jsonable(donor.resolve(op, fqn)))
                 for fqn, op in differing(base, donor, modules).items()]
    return dataclasses.replace(base, name=name, overrides=[*base.overrides, *overrides])


def op_order(ops: set[str]) -> list[str]:
    """Op kinds in the order OpsNumerics declares them (router, experts, ..., logprobs)."""
    return [op for op in OP_KINDS if op in ops]

"""Placement policies, chosen by name in the app args or by "module:Class" import path."""

from __future__ import annotations

import importlib

from adrenaline.config import ConfigError
from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy

POLICIES = {
    "least_loaded": "adrenaline.policy.least_loaded:LeastLoaded",
    "none": "adrenaline.policy.least_loaded:LeastLoaded",
    "static": "adrenaline.policy.static:StaticRatio",
    "load_aware": "adrenaline.policy.load_aware:LoadAware",
}


def policy_class(name: str) -> type[PlacementPolicy]:
    """The class a policy name (registered, or "module:Class") stands for."""
    path = POLICIES.get(name, name)
    module, sep, cls = path.partition(":")
    if not sep:
        raise ConfigError(f"policy: unknown policy {name!r} (known: {', '.join(POLICIES)}; "
                          "or give 'module:Class')")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"policy: cannot load {path!r}: {e}") from None
    if not (isinstance(found, type) and issubclass(found, PlacementPolicy)):
        raise ConfigError(f"policy: {path!r} is not a PlacementPolicy")
    return found


def needs_profile(name: str) -> bool:
    """Whether the policy declares it needs the cluster's start-up profile."""
    return policy_class(name).needs_profile


def make_policy(name: str, options: dict | None = None, profile=None) -> PlacementPolicy:
    return policy_class(name)(options, profile)


__all__ = ["ClusterLoad", "Placement", "PlacementPolicy", "make_policy", "needs_profile",
           "policy_class", "POLICIES"]

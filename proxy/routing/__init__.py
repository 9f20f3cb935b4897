"""Routing policies: one module per policy, chosen by name from the proxy config.

A shipped policy is a public module of this package exposing ``POLICY``, a
:class:`~proxy.routing.base.RoutingPolicy` subclass. An out-of-tree policy is any
importable module with the same attribute, named by its dotted path::

    prefill_policy: {name: prefill_cost, options: {prior_tokens_per_s: 2000}}
    decode_policy:  {name: mycompany.routing.sticky, options: {}}

Adding a policy is one new file here; nothing else needs to know about it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from proxy.routing.base import RoutingPolicy, RoutingRequest

__all__ = ["RoutingPolicy", "RoutingRequest", "load_policy", "shipped_policies"]

# Modules of this package that are not policies.
_NOT_POLICIES = frozenset({"base"})


def shipped_policies() -> list[str]:
    """Names of the policies that ship with pdserve, sorted."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and info.name not in _NOT_POLICIES
    )


def load_policy(spec_name: str, options: Mapping[str, Any]) -> RoutingPolicy:
    """Build the policy named ``spec_name`` with the config's ``options``.

    A bare name ``x`` means the shipped module ``proxy.routing.x``; a dotted name
    is imported as is. Every failure (unknown name, a module without ``POLICY``,
    an unknown or invalid option) is a ``ValueError`` naming the policy.
    """
    if not isinstance(spec_name, str) or not spec_name.strip():
        raise ValueError(
            f"routing policy name must be a non-empty string, got {spec_name!r}; "
            f"shipped policies: {', '.join(shipped_policies())}"
        )
    if not isinstance(options, Mapping):
        raise ValueError(
            f"routing policy {spec_name!r}: options must be a mapping, got {type(options).__name__}"
        )
    module = _import_policy_module(spec_name.strip())
    policy_cls = getattr(module, "POLICY", None)
    if not (isinstance(policy_cls, type) and issubclass(policy_cls, RoutingPolicy)):
        raise ValueError(
            f"routing policy {spec_name!r}: module {module.__name__!r} has no POLICY attribute "
            f"naming a RoutingPolicy subclass"
        )
    _check_option_names(spec_name, policy_cls, options)
    try:
        return policy_cls(**dict(options))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"routing policy {spec_name!r}: {exc}") from exc


def _import_policy_module(name: str) -> ModuleType:
    if "." in name:
        module_name = name
    elif name.isidentifier() and not name.startswith("_") and name not in _NOT_POLICIES:
        module_name = f"{__name__}.{name}"
    else:
        raise ValueError(_unknown_message(name))
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing policy module is "unknown"; a policy whose own imports
        # fail is a broken policy and must say so.
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ValueError(_unknown_message(name)) from exc
        raise ValueError(f"routing policy {name!r} failed to import: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"routing policy {name!r} failed to import: {exc}") from exc


def _unknown_message(name: str) -> str:
    return (
        f"unknown routing policy {name!r}; shipped policies: {', '.join(shipped_policies())} "
        f"(or a dotted module path exposing POLICY)"
    )


def _check_option_names(
    spec_name: str, policy_cls: type[RoutingPolicy], options: Mapping[str, Any]
) -> None:
    """Refuse unknown option names up front, listing the accepted ones."""
    parameters = inspect.signature(policy_cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = sorted(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    unknown = sorted(str(key) for key in options if key not in accepted)
    if unknown:
        raise ValueError(
            f"routing policy {spec_name!r}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )

"""Find driver and agent plugins through entry points (stevedore).

``pip install`` a distribution that declares an entry point in ``gateway.drivers`` or ``gateway.agents``
and it is found here.  A plugin that fails to import never hides the others and is never reported as
"not found": its error is kept and shown by name (stevedore's failure callback records it instead of
swallowing it).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import attrs
from stevedore import ExtensionManager

from gateway.agent import Agent
from gateway.driver import Driver
from gateway.errors import PluginError

__all__ = ["AGENTS", "DRIVERS", "Plugin", "PluginRegistry"]

DRIVERS = "gateway.drivers"
AGENTS = "gateway.agents"
_BASES: dict[str, type[Any]] = {DRIVERS: Driver, AGENTS: Agent}


@attrs.frozen
class Plugin:
    """One entry point: the loaded class, or the reason it could not be loaded."""

    group: str
    name: str
    target: str  # "module:attr" as declared
    distribution: str
    version: str
    cls: type[Any] | None = None
    error: str = ""

    @property
    def title(self) -> str:
        return str(getattr(self.cls, "title", "")) or self.name

    @property
    def description(self) -> str:
        return str(getattr(self.cls, "description", ""))


class PluginRegistry:
    """The drivers and agents available to this process.

    Build it with :meth:`discover` (entry points) or, in tests, :meth:`from_classes` — the labelled
    test seam, like stevedore's ``make_test_instance``.
    """

    def __init__(self, plugins: Mapping[str, Mapping[str, Plugin]]) -> None:
        self._plugins = {group: dict(found) for group, found in plugins.items()}

    @classmethod
    def discover(cls) -> PluginRegistry:
        return cls({group: _load_group(group) for group in (DRIVERS, AGENTS)})

    @classmethod
    def from_classes(
        cls,
        *,
        drivers: Mapping[str, type[Driver]] | None = None,
        agents: Mapping[str, type[Agent]] | None = None,
    ) -> PluginRegistry:
        """A registry of the given classes only (test seam)."""

        def wrap(group: str, classes: Mapping[str, type[Any]]) -> dict[str, Plugin]:
            return {
                name: Plugin(group, name, f"{c.__module__}:{c.__qualname__}", "(test)", "", c)
                for name, c in classes.items()
            }

        return cls({DRIVERS: wrap(DRIVERS, drivers or {}), AGENTS: wrap(AGENTS, agents or {})})

    def all(self, group: str) -> list[Plugin]:
        return sorted(self._plugins.get(group, {}).values(), key=lambda p: p.name)

    def driver(self, name: str) -> type[Driver]:
        return self._get(DRIVERS, name, "driver")

    def agent(self, name: str) -> type[Agent]:
        return self._get(AGENTS, name, "agent")

    def _get(self, group: str, name: str, kind: str) -> Any:
        found = self._plugins.get(group, {})
        plugin = found.get(name)
        if plugin is None:
            available = ", ".join(sorted(n for n, p in found.items() if p.cls)) or "none installed"
            raise PluginError(
                f"unknown {kind} type {name!r} (available: {available})", group=group, name=name
            )
        if plugin.cls is None:
            raise PluginError(
                f"{kind} {name!r} from {plugin.distribution} failed to load: {plugin.error}",
                group=group,
                name=name,
            )
        return plugin.cls


def _load_group(group: str) -> dict[str, Plugin]:
    failures: dict[str, Plugin] = {}

    def record_failure(manager: Any, entry_point: Any, exc: BaseException) -> None:
        failures[entry_point.name] = _plugin(group, entry_point, error=_describe(exc))

    manager = ExtensionManager(
        namespace=group,
        invoke_on_load=False,
        on_load_failure_callback=record_failure,
    )
    plugins = dict(failures)
    for ext in manager:
        cls = ext.plugin
        base = _BASES[group]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            plugins[ext.name] = _plugin(
                group,
                ext.entry_point,
                error=f"{ext.entry_point.value} is not a {base.__name__} class",
            )
        elif getattr(cls, "settings_class", None) is None:
            plugins[ext.name] = _plugin(
                group, ext.entry_point, error=f"{ext.entry_point.value} declares no settings_class"
            )
        else:
            plugins[ext.name] = _plugin(group, ext.entry_point, cls=cls)
    return plugins


def _plugin(
    group: str, entry_point: Any, *, cls: type[Any] | None = None, error: str = ""
) -> Plugin:
    distribution, version = _distribution(group, entry_point.name, entry_point.value)
    return Plugin(
        group=group,
        name=entry_point.name,
        target=entry_point.value,
        distribution=distribution,
        version=version,
        cls=cls,
        error=error,
    )


def _distribution(group: str, name: str, target: str) -> tuple[str, str]:
    """The distribution declaring this entry point, and its version.

    stevedore's entry-point cache drops the distribution, so it is looked up in the package metadata.
    """
    for entry_point in importlib.metadata.entry_points(group=group, name=name):
        dist = entry_point.dist
        if entry_point.value == target and dist is not None:
            return dist.name, dist.version
    return "?", "?"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

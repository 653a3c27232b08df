"""The plugin manager: hookspecs + the `meshtrain` entry-point group, and the merged catalogs.

Built-in plugins (plugins/meshtrain_*) register exactly like third-party packages, so this module
never imports them. A catalog maps a name (what the TOML writes) to its provider and plugin.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from meshtrain import hookspecs
from meshtrain.errors import UserError, suggest

CATALOGS = {
    "model_families": "model family",
    "pipeline_schedules": "pipeline schedule",
    "data_sources": "data source",
}


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, for `meshtrain plugins`."""

    name: str
    distribution: str
    version: str
    hooks: list[str]
    provides: dict[str, list[str]]


class Plugins:
    """Loaded plugins and their merged catalogs."""

    def __init__(self, disable: list[str] = (), extra: list[Any] = ()):
        self.pm = pluggy.PluginManager("meshtrain")
        self.pm.add_hookspecs(hookspecs)
        for name in disable:
            self.pm.set_blocked(name)
        self.pm.load_setuptools_entrypoints("meshtrain")
        for plugin in extra:  # tests register objects directly
            self.pm.register(plugin)
        self.pm.check_pending()
        self.catalogs = {hook: self._merge(hook) for hook in CATALOGS}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _merge(self, hook: str) -> dict[str, tuple[Any, str]]:
        merged: dict[str, tuple[Any, str]] = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            owner = self.pm.get_name(impl.plugin)
            provided = impl.function()
            if not isinstance(provided, dict):
                raise UserError(
                    f"plugin {owner}: hook {hook} must return a dict, got {type(provided).__name__}"
                )
            for name, provider in provided.items():
                if name in merged:
                    raise UserError(
                        f"{CATALOGS[hook]} {name!r} is provided twice: by plugin "
                        f"{merged[name][1]} and by plugin {owner}; disable one with "
                        "[plugins] disable = [...]"
                    )
                merged[name] = (provider, owner)
        return merged

    def get(self, hook: str, name: str, key: str) -> Any:
        """The provider called `name` in catalog `hook`; `key` is the TOML key that chose it."""
        catalog = self.catalogs[hook]
        if name not in catalog:
            available = ", ".join(sorted(catalog)) or "none installed"
            raise UserError(
                f"{key}: unknown {CATALOGS[hook]} {name!r}{suggest(name, catalog)}; "
                f"available: {available}"
            )
        return catalog[name][0]

    def module_names(self) -> list[str]:
        """Import names of the loaded plugin modules and of their submodules imported so far
        (plugins load their heavy parts on first use), for preloading in worker processes."""
        roots = {getattr(p, "__name__", "") for p in self.pm.get_plugins()} - {""}
        return sorted(name for name in list(sys.modules) if name.split(".")[0] in roots)

    def describe(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution, hooks and provided names."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin)
            dist = dists.get(id(plugin))
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            provides = {
                hook: sorted(n for n, (_, owner) in self.catalogs[hook].items() if owner == name)
                for hook in CATALOGS
            }
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist.project_name if dist else "(registered directly)",
                    version=dist.version if dist else "-",
                    hooks=hooks,
                    provides={k: v for k, v in provides.items() if v},
                )
            )
        return sorted(infos, key=lambda info: info.name)


def entry_point_names() -> list[str]:
    """Names in the `meshtrain` entry-point group, loaded or not (for messages)."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="meshtrain"))

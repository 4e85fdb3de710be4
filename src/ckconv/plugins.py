"""The plugin host: builds the pluggy manager, loads built-in and third-party plugins, owns the registries.

Built-in formats and architectures are plain modules registered through the same hooks as third-party packages,
which load from the ``ckconv`` entry-point group. ``CKCONV_LOAD_PLUGINS`` (comma-separated names) limits which
third-party plugins load; set but empty loads none. A plugin that fails to import, raises or registers a
duplicate name is recorded in ``Host.problems`` and the rest of ckconv carries on.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import PluginError, UsageError, did_you_mean
from .formats.base import Format

__all__ = ["BUILTIN_PLUGINS", "PluginInfo", "get_plugin_manager", "host", "reset"]

BUILTIN_PLUGINS = (
    "ckconv.formats.torchscript",  # before torch: a TorchScript archive is a torch.save-style zip with code
    "ckconv.formats.torch_pickle",
    "ckconv.formats.torch_sharded",  # before safetensors: it claims the *.index.json files whose shards are torch
    "ckconv.formats.safetensors_format",
    "ckconv.formats.dcp",
    "ckconv.formats.torch_export",
    "ckconv.formats.deepspeed",
    "ckconv.architectures_torchvision",
)
HOOKS = ("ckconv_register_formats", "ckconv_register_architectures", "ckconv_register_key_rules")
KINDS = {"ckconv_register_formats": "formats", "ckconv_register_architectures": "architectures",
         "ckconv_register_key_rules": "key_rules"}


@dataclass
class PluginInfo:
    name: str
    version: str
    builtin: bool
    registers: dict = field(default_factory=lambda: {"formats": [], "architectures": [], "key_rules": []})


@dataclass
class Host:
    manager: pluggy.PluginManager
    plugins: dict = field(default_factory=dict)  # name -> PluginInfo
    formats: dict = field(default_factory=dict)  # name -> Format
    architectures: dict = field(default_factory=dict)  # namespace -> ArchitectureSource
    key_rules: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)  # (kind, name) -> plugin name
    problems: list = field(default_factory=list)  # (plugin name, message)

    def format(self, name):
        if name not in self.formats:
            raise UsageError(f"unknown format {name!r}{did_you_mean(name, self.formats)}; known formats: "
                             f"{', '.join(sorted(self.formats))}")
        return self.formats[name]


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ckconv")
    pm.add_hookspecs(hookspecs)
    return pm


def _tracing():
    return os.environ.get("CKCONV_TRACE_PLUGINS", "") not in ("", "0")


def _trace(msg, exc=None):
    if _tracing():
        print(f"ckconv plugins: {msg}", file=sys.stderr)
        if exc is not None:
            traceback.print_exception(exc, file=sys.stderr)


def build_host(load_entry_points=True) -> Host:
    host = Host(get_plugin_manager())
    for modname in BUILTIN_PLUGINS:
        module = importlib.import_module(modname)
        host.manager.register(module, name=modname)
        host.plugins[modname] = PluginInfo(modname, _own_version(), True)
        _trace(f"loaded built-in {modname}")
    if load_entry_points:
        _load_entry_points(host)
    for hook in HOOKS:
        for impl in getattr(host.manager.hook, hook).get_hookimpls():
            _collect(host, hook, impl)
    return host


def _own_version():
    try:
        return metadata.version("ckconv")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _load_entry_points(host: Host):
    allowed = os.environ.get("CKCONV_LOAD_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    seen = set()
    for ep in metadata.entry_points(group="ckconv"):
        seen.add(ep.name)
        if names is not None and ep.name not in names:
            _trace(f"skipping {ep.name} (not in CKCONV_LOAD_PLUGINS)")
            continue
        if ep.name in host.plugins:
            host.problems.append((ep.name, "a plugin with this name is already loaded; skipped"))
            continue
        version = ep.dist.version if getattr(ep, "dist", None) else "?"
        try:
            module = ep.load()
            host.manager.register(module, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take ckconv down
            host.problems.append((ep.name, f"failed to load ({ep.value} {version}): {type(exc).__name__}: {exc}"))
            _trace(f"{ep.name} failed to load", exc)
            continue
        host.plugins[ep.name] = PluginInfo(ep.name, version, False)
        _trace(f"loaded {ep.name} {version} from {ep.value}")
        unknown = sorted(c.name for c in host.manager.get_hookcallers(module) or () if c.spec is None)
        if unknown:
            host.problems.append((ep.name, f"implements unknown hook(s) {', '.join(unknown)}, which ckconv never "
                                           f"calls; known hooks: {', '.join(HOOKS)}"))
    for name in sorted((names or set()) - seen):
        host.problems.append((name, "named in CKCONV_LOAD_PLUGINS but not installed (no such entry point in the "
                                    "'ckconv' group)"))


def _collect(host: Host, hook: str, impl):
    plugin = impl.plugin_name
    kind = KINDS[hook]
    staged = []

    def register(item):
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin} registered a {kind[:-1]} without a name")
        if kind == "formats" and not isinstance(item, Format):  # every capability is declared there
            raise PluginError(f"plugin {plugin} registered format {name!r}, which is not a ckconv.formats.Format: "
                              "subclass it")
        staged.append(item)

    try:
        impl.function(register=register)
    except Exception as exc:  # noqa: BLE001
        host.problems.append((plugin, f"{hook} raised {type(exc).__name__}: {exc}; registered none of its {kind}"))
        _trace(f"{plugin}.{hook} raised {exc!r}", exc)
        return
    for item in staged:
        owner = host.owners.get((kind, item.name))
        if owner is not None:
            host.problems.append((plugin, f"{kind[:-1]} {item.name!r} is registered by both {owner} and {plugin}; "
                                          f"kept {owner}'s"))
            continue
        host.owners[(kind, item.name)] = plugin
        if kind == "key_rules":
            host.key_rules.append(item)
        else:
            getattr(host, kind)[item.name] = item
        host.plugins[plugin].registers[kind].append(item.name)
        _trace(f"{plugin} registered {kind[:-1]} {item.name}")


_HOST: Host | None = None


def host() -> Host:
    global _HOST
    if _HOST is None:
        _HOST = build_host()
    return _HOST


def reset():
    """Forget the loaded plugins (tests; after changing CKCONV_LOAD_PLUGINS)."""
    global _HOST
    _HOST = None

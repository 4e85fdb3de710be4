"""ckconv's extension points. A plugin implements any of these with ``@ckconv.hookimpl``.

Each hook receives a ``register`` callback; the plugin calls it once per thing it provides. ckconv owns the
registries, so a name registered twice is an error that names both plugins. docs/plugins.md documents every hook
(tests/test_plugin_docs.py keeps the two in step).
"""

import pluggy

__all__ = ["ckconv_register_architectures", "ckconv_register_formats", "ckconv_register_key_rules", "hookimpl",
           "hookspec"]

hookspec = pluggy.HookspecMarker("ckconv")
hookimpl = pluggy.HookimplMarker("ckconv")


@hookspec
def ckconv_register_formats(register):
    """Register checkpoint formats: call ``register(fmt)`` with a :class:`ckconv.formats.Format` per format."""


@hookspec
def ckconv_register_architectures(register):
    """Register model families: call ``register(source)`` with a :class:`ckconv.architectures.ArchitectureSource`."""


@hookspec
def ckconv_register_key_rules(register):
    """Register key renames: call ``register(rule)`` with a :class:`ckconv.rules.KeyRule` per rule."""

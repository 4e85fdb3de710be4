"""``ckconv plugins``: what the plugin host loaded, and the plugins it could not load."""

from __future__ import annotations

import click

from .common import echo_json, table, warn


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plugin list as JSON.")
def plugins(as_json):
    """List plugins, their versions and what each registers.

    \b
    Examples:
      ckconv plugins
      ckconv plugins --json
    """
    from ..plugins import host

    h = host()
    rows = [{"name": p.name, "version": p.version, "builtin": p.builtin, **p.registers} for p in h.plugins.values()]
    problems = [{"plugin": n, "problem": m} for n, m in h.problems]
    if as_json:
        echo_json({"plugins": rows, "problems": problems})
        return
    click.echo(table([(r["name"], r["version"], "built-in" if r["builtin"] else "third-party",
                       "; ".join(f"{k}: {', '.join(r[k])}" for k in ("formats", "architectures", "key_rules") if r[k]))
                      for r in rows], ["plugin", "version", "kind", "registers"]))
    for p in problems:
        warn(f"problem: {p['plugin']}: {p['problem']}")

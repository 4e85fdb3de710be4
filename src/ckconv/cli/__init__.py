"""The ``ckconv`` command: parse, call the API, render the result. Errors become one line on stderr.

The group lives here; each command family is a module of its own (``convert_cmd``, ``match_cmd``, ``inspect_cmds``,
``plugins_cmd``) that defines its commands without knowing the group, so the modules import only ``common``.
"""

from __future__ import annotations

import click

from .common import RUN, CkconvGroup, reader_went_away
from .convert_cmd import convert
from .inspect_cmds import diff, inspect, scan
from .match_cmd import match
from .plugins_cmd import plugins


@click.group(cls=CkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckconv")
@click.option("-q", "--quiet", is_flag=True, help="Only data and errors: no warnings, notes or progress bar.")
@click.option("-v", "--verbose", "loud", is_flag=True,
              help="More detail: the keys behind a warning, every unknown global, skipped files.")
def cli(quiet, loud):
    """Convert, inspect and compare PyTorch checkpoints safely and losslessly.

    Data goes to stdout; warnings (`warning: ...`), the progress bar and errors to stderr. Shell completion:
    eval "$(_CKCONV_COMPLETE=bash_source ckconv)" (zsh_source, fish_source for other shells).
    """
    if quiet and loud:
        raise click.UsageError("-q and -v contradict each other; pass one")
    RUN["verbosity"] = -1 if quiet else 1 if loud else 0


for command in (convert, match, inspect, diff, scan, plugins):
    cli.add_command(command)


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: staged outputs are removed, one line on stderr, exit 1


def main():
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill`, a closed terminal, a scheduler's timeout
        signal.signal(sig, _terminated)
    try:
        cli(prog_name="ckconv")
    except BrokenPipeError:
        reader_went_away()

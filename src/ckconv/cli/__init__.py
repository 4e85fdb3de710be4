"""The ``ckconv`` command: parse, call the API, render the result. Errors become one line on stderr.

The group lives here; each command family is a module of its own (``convert_cmd``, ``match_cmd``, ``inspect_cmds``,
``plugins_cmd``) that defines its commands without knowing the group, so the modules import only ``common``.
"""

from __future__ import annotations

import sys

import click

from .common import RUN, CkconvGroup, interrupted_code, reader_went_away, verbosity_options
from .convert_cmd import convert
from .inspect_cmds import diff, inspect, scan
from .match_cmd import match
from .plugins_cmd import plugins


@click.group(cls=CkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckconv")
@verbosity_options
def cli():
    """Convert, inspect and compare PyTorch checkpoints safely and losslessly.

    Data goes to stdout; warnings (`warning: ...`), the progress bar and errors to stderr. Shell completion:
    eval "$(_CKCONV_COMPLETE=bash_source ckconv)" (zsh_source, fish_source for other shells).
    Exit codes: 0 yes, 1 no (or a failed command), 2 trouble (usage), 130 interrupted.

    \b
    Examples:
      ckconv convert model.pth model.safetensors
      ckconv inspect model.pth
      ckconv scan downloads/
      ckconv diff model.pth model.safetensors
      ckconv convert --help
    """


for command in (convert, match, inspect, diff, scan, plugins):
    cli.add_command(verbosity_options(command))


def _interrupted(signum, frame):
    """Ctrl-C, `kill`, a closed terminal, a scheduler's timeout: unwind like Ctrl-C (staged outputs are removed,
    one line on stderr) and exit 128 + the signal's number."""
    RUN["signal"] = signum
    raise KeyboardInterrupt


def main():
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    try:
        cli(prog_name="ckconv")
    except BrokenPipeError:
        reader_went_away()
    except KeyboardInterrupt:  # before or after a command ran (while parsing, while importing)
        sys.exit(interrupted_code())

"""One exception hierarchy for everything ckconv refuses or fails to do.

The message of every error is a single line that says what is wrong and, where it helps, what to do next.
The CLI prints it as ``Error: <message>`` and exits 1; nothing else in ckconv turns errors into exit codes.
"""


class CkconvError(Exception):
    """Base class of every error ckconv raises on bad input or a failed operation."""


class NotACheckpoint(CkconvError):
    """The bytes are not a checkpoint ckconv can read (empty, truncated, foreign, unknown format)."""


class CorruptCheckpoint(CkconvError):
    """The file claims to be a checkpoint but fails an integrity check (CRC, sizes, offsets)."""


class UnsafeCheckpoint(CkconvError):
    """The file would run code when loaded (dangerous pickle globals), or an output would name globals ckconv does
    not know to be benign. ``globals`` lists the dotted names."""

    def __init__(self, message, globals_=()):
        super().__init__(message)
        self.globals = list(globals_)


class UnsupportedContent(CkconvError):
    """Valid input holding something ckconv does not convert (sparse, quantized, TorchScript, big-endian)."""


class LimitExceeded(CkconvError):
    """The input exceeds a safety limit (depth, object count, tensor count, memory budget)."""


class OutputExists(CkconvError):
    """The destination exists and ``--force`` was not given."""


class WriteFailed(CkconvError):
    """Writing the output failed (disk full, permissions); nothing was left at the destination."""


class PluginError(CkconvError):
    """A plugin failed to load or registered something invalid."""


class UsageError(CkconvError):
    """The request itself is inconsistent (unknown format, bad option value)."""


def did_you_mean(name, choices) -> str:
    """``"; did you mean vgg16?"`` for a near miss among ``choices`` (a swapped pair of letters first), else ``""``."""
    import difflib

    name = str(name).lower()
    ratio = {c: difflib.SequenceMatcher(None, name, c.lower()).ratio() for c in {str(c) for c in choices}}
    close = sorted((c for c, r in ratio.items() if r >= 0.6), key=lambda c: (-ratio[c], c))
    swapped = [c for c in close if sorted(c.lower()) == sorted(name)]
    close = swapped[:1] or [c for c in close if ratio[c] >= ratio[close[0]] - 0.05][:3]
    if not close:
        return ""
    return "; did you mean " + (", ".join(close[:-1]) + " or " if len(close) > 1 else "") + close[-1] + "?"

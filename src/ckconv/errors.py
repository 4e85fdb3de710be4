"""One exception hierarchy for everything ckconv refuses or fails to do.

The message of every error is a single line that says what is wrong and, where it helps, what to do next.
The CLI prints it as ``Error: <message>`` and exits with the class's ``exit_code`` (1; 2 for a usage error); nothing
else in ckconv turns errors into exit codes.
"""

__all__ = ["CkconvError", "CkconvWarning", "CorruptCheckpoint", "LimitExceeded", "MissingExtra", "NotACheckpoint",
           "OutputExists", "PluginError", "UnsafeCheckpoint", "UnsupportedContent", "UsageError", "WriteFailed",
           "did_you_mean", "import_torch"]


class CkconvError(Exception):
    """Base class of every error ckconv raises on bad input or a failed operation."""

    exit_code = 1  # the CLI's exit status for it: 1 a failed command, 2 trouble with the request (as diff, cmp)


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

    exit_code = 2


class MissingExtra(UsageError, ModuleNotFoundError):
    """A feature needs an optional dependency that is not installed (torch: ``pip install 'ckconv[torch]'``)."""


def import_torch(what: str):
    """``import torch`` for a feature that needs the ``ckconv[torch]`` extra; :class:`MissingExtra`, one line
    naming the extra, when torch is not installed (``... needs torch, which is not installed: ...``)."""
    try:
        import torch  # the caller needs it: the import stays off every path that does not
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "torch":
            raise  # something torch itself imports is missing: not ours to rename
        raise MissingExtra(f"{what} needs torch, which is not installed: pip install 'ckconv[torch]'",
                           name=exc.name) from None
    return torch


class CkconvWarning(UserWarning):
    """Something done that the user may not have meant, never data: the CLI prints it as one ``warning:`` line."""


def did_you_mean(word, names, prefix="") -> str:
    """``"; did you mean vgg16?"`` for the names nearest ``word`` (typos: a swap, a letter more, less or changed),
    else ``""``; the one spelling helper of every message (formats, sections, architectures, commands)."""
    word = str(word).lower()
    limit = max(1, len(word) // 4)
    scored = []
    for name in dict.fromkeys(str(n) for n in names):
        if abs(len(name) - len(word)) > limit:
            continue
        d = _edit_distance(word, name.lower(), limit)
        if d <= limit:
            scored.append((d, sorted(name.lower()) != sorted(word), name))  # an anagram (vgg61) is a swap
    if not scored:
        return ""
    scored.sort()
    best = [n for d, swap, n in scored if (d, swap) == scored[0][:2]][:3]
    return "; did you mean " + " or ".join(prefix + n for n in best) + "?"


def _edit_distance(a, b, limit):
    """Optimal string alignment distance (a swap of neighbours counts 1), stopping once past ``limit``."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]

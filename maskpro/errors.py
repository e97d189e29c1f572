"""User-facing errors: one line that names the problem and the fix, and one exit-code scheme for every CLI.

Exit codes of every maskpro command: 0 ok, 1 a check failed (a broken N:M pattern), 2 bad input (options,
files, a missing engine), 130 interrupted. Messages are ``PROG: error: ...`` on stderr, without a traceback;
anything else escaping is a bug.
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class MaskproError(ValueError):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""

    exit_code = EXIT_BAD_INPUT


class PatternError(MaskproError):
    """A model that should be N:M sparse is not (or has no sparse layer): the check failed."""

    exit_code = EXIT_CHECK_FAILED


def fail(prog: str, exc: BaseException | str, code: int | None = None) -> int:
    """Print ``prog: error: MESSAGE`` and return the exit code (the error's own unless ``code`` is given)."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code if code is not None else getattr(exc, "exit_code", EXIT_BAD_INPUT)


def run_cli(prog: str, body: Callable[[], object], interrupted: str) -> int:
    """Run a command's body and map its outcome to the exit-code scheme above.

    ``body`` may return an int exit code (a server that failed to start); any other result means 0.
    """
    try:
        result = body()
    except MaskproError as exc:
        return fail(prog, exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK

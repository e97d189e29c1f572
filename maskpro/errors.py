"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``MaskproError`` messages without a traceback; everything else is a bug.
"""

from __future__ import annotations

import sys
from typing import Callable


class MaskproError(ValueError):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""


def run_cli(prog: str, body: Callable[[], object], interrupted: str) -> int:
    """Run a command's body: exit 0; 2 with one ``prog: error: ...`` line on bad input; 130 on Ctrl-C.

    Every maskpro command ends this way, so a user never sees a traceback for a problem they can fix.
    """
    try:
        body()
    except MaskproError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    return 0

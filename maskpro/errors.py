"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``MaskproError`` messages without a traceback; everything else is a bug.
"""


class MaskproError(ValueError):
    """A problem with the user's input or environment, phrased as 'what is wrong; what to do'."""

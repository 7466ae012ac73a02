"""The one exception type for user mistakes.

The runner catches :class:`UserInputError`, prints its message on one line and exits with status 2, so a user who
mistypes a flag or points at the wrong folder sees what to fix instead of a traceback. Library code raises it for
anything the caller can correct (bad flags, bad files, bad settings); genuine bugs keep raising ordinary exceptions.
"""


class UserInputError(ValueError):
    """A mistake in the user's input (flags, files, settings) that the user can fix."""

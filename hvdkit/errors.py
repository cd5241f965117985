"""The one exception type users see for bad input; the CLI and examples print it as one line."""


class HvdkitError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    Example::

        raise HvdkitError("batch_size must be >= 1 (got 0); pass --batch-size 32")
    """

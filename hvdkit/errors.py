"""The one exception type users see for bad input; the CLI and examples print it as one line."""
import argparse


class HvdkitError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    Example::

        raise HvdkitError("batch_size must be >= 1 (got 0); pass --batch-size 32")
    """


class RankFailed(HvdkitError):
    """One rank raised (a bug, not bad input): the one line every rank stops with names that rank, where it was and
    its error; the original exception is ``__cause__`` on the failing rank. Scripts exit 1 on it, not 2."""


class StoppedOnEveryRank(HvdkitError):
    """Raised at the same step on every rank from values every rank shares (a non-finite step, an early-stopping
    or monitor problem), so no rank is left waiting in a collective: the trainer passes it through as it is, one
    identical line per rank, without naming a failing rank or shutting Horovod down."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``hvdkit: error: <problem>; see <prog> --help`` line and exit 2 (plain
    argparse prints its whole usage block first, once per rank in a launched job). Subparsers inherit it.

    Example::

        OneLineParser(prog="train.py").parse_args(["--bogus"])
        # hvdkit: error: unrecognized arguments: --bogus; see train.py --help   (exit 2)
    """

    def error(self, message):
        self.exit(2, f"hvdkit: error: {message}; see {self.prog} --help\n")

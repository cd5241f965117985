"""Silence TensorFlow's native start-up lines (oneDNN, absl) that no environment variable turns off.

Example::

    with native_stderr_silenced():
        import tensorflow
"""
import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True):
    """Point file descriptor 2 at /dev/null while the block runs; Python exceptions still propagate."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

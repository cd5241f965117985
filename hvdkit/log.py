"""Rank-aware logging: rank 0 speaks, other ranks only warn.

Example::

    log = get_logger(rank=0)
    log.info("epoch 1 done")      # printed on rank 0 only
"""
import logging
import sys


def get_logger(rank: int, name: str = "hvdkit") -> logging.Logger:
    logger = logging.getLogger(f"{name}.rank{rank}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[hvdkit rank {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger

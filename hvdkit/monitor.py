"""The monitored metric: its best value so far and the evaluations since it last improved (early stopping).

Framework-free and pure: the trainer keeps the record in ``progress["best"]``, so commits, rollbacks, resizes
and resumes carry it, and rank 0's record is broadcast after every evaluation, so every rank takes the same
stop decision.

Example::

    record = update_record(None, cfg, {"eval_accuracy": 0.91}, epoch=1)
    record = update_record(record, cfg, {"eval_accuracy": 0.90}, epoch=2)   # record["bad"] == 1
    should_stop(record, cfg)
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from .errors import StoppedOnEveryRank

Record = Dict[str, Any]


def watching(cfg) -> bool:
    """True when something uses the monitored metric (best checkpoints or early stopping)."""
    return bool(cfg.keep_best or cfg.early_stopping_patience)


def improves(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta`` (any number beats None; NaN beats nothing)."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def monitored_value(cfg, metrics: Dict[str, Any], epoch: int) -> float:
    """The monitored metric out of one epoch's metrics; a missing name stops every rank with one line."""
    if cfg.monitor not in metrics:
        known = ", ".join(k for k in metrics if isinstance(metrics[k], (int, float)))
        raise StoppedOnEveryRank(f"the monitored metric {cfg.monitor} is not among the metrics of epoch {epoch} "
                                 f"({known}); pass --monitor with one of them")
    return float(metrics[cfg.monitor])


def update_record(record: Optional[Record], cfg, metrics: Dict[str, Any], epoch: int) -> Record:
    """The record after the evaluation of ``epoch`` (1-based): best value and its epoch, evaluations without
    improvement (``bad``), the last value. A record of another metric or direction starts afresh."""
    mode = cfg.monitor_direction()
    if not record or record.get("monitor") != cfg.monitor or record.get("mode") != mode:
        record = {"monitor": cfg.monitor, "mode": mode, "value": None, "epoch": None, "bad": 0}
    value = monitored_value(cfg, metrics, epoch)
    record = dict(record, last=value)
    if improves(value, record["value"], mode, cfg.min_delta):
        record.update(value=value, epoch=epoch, bad=0)
    else:
        record["bad"] = int(record["bad"]) + 1
    return record


def should_stop(record: Optional[Record], cfg) -> bool:
    """Early stopping: ``early_stopping_patience`` evaluations in a row without improvement."""
    return bool(cfg.early_stopping_patience and record and record.get("monitor") == cfg.monitor
                and record.get("mode") == cfg.monitor_direction()
                and int(record.get("bad", 0)) >= cfg.early_stopping_patience)


def stop_line(record: Record, cfg, epoch: int) -> str:
    return (f"early stopping after epoch {epoch}: {cfg.monitor} has not improved"
            f"{f' by more than {cfg.min_delta:g}' if cfg.min_delta else ''} for {record['bad']} evaluations "
            f"(best {record['value']:.6g} at epoch {record['epoch']})")

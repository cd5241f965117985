"""The trainer: one ``fit`` that wires process, adapter and feeds together, static or elastic.

The trainer never touches a tensor. Its roles: a :class:`hvdkit.process.Process` (rank, size,
collectives; Horovod's, or ``LocalProcess`` at world size 1), an :class:`hvdkit.adapter.Adapter`
(model and optimizer) and a :class:`hvdkit.feed.Feed` per dataset (the step plan and the batches).
Every rank runs the same loop (:mod:`hvdkit.loop`) and the same number of steps; decisions only rank 0
can make (can the checkpoint directory be written? which checkpoint is valid?) are broadcast before
anyone acts on them, so bad input fails on every rank alike instead of leaving the others blocked.

Started by ``horovodrun`` in elastic mode (``HOROVOD_ELASTIC=1``), the same loop runs inside Horovod's
elastic retry loop: state is committed every ``commit_every`` steps; a lost worker rolls everyone back
to the last commit, a resize re-splits the rest of the epoch over the new workers (positions are
counted in samples), and the LR follows the new world size.

Example::

    from hvdkit import Trainer, TrainConfig
    from hvdkit.torch import TorchAdapter

    adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn)
    result = Trainer(adapter, TrainConfig(epochs=3, batch_size=64)).fit((x_train, y_train), (x_test, y_test))
    print(result.eval["accuracy"], result.samples_per_sec)
"""
from __future__ import annotations

import os
import random
import traceback
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .adapter import Adapter
from .audit import AuditLog
from .callbacks import Callback, LogLines, ProgressBar, TensorBoard
from .checkpoint import BestStore, CheckpointStore, ensure_writable_dir
from .config import TrainConfig
from .errors import HvdkitError, RankFailed, StoppedOnEveryRank
from .log import get_logger
from .loop import EpochLoop
from .process import Process
from .resume import load_latest, resume_line, resumed_progress
from .run_state import COMPLETE_MARK, START_MARK, FitResult, Run, fresh_progress
from .sharded_checkpoint import write_shard
from .sharding import check_train_config


class Trainer:
    """Runs ``fit`` with one adapter and one config; see the module docstring.

    process: who this worker is and how ranks talk; default the adapter framework's ``HorovodProcess``.
    Pass ``LocalProcess()`` (``hvdkit.torch.process`` / ``hvdkit.keras.process``) to train at world
    size 1 without Horovod.
    """

    def __init__(self, adapter: Adapter, config: Optional[TrainConfig] = None,
                 callbacks: Sequence[Callback] = (), process: Optional[Process] = None):
        self.adapter = adapter
        self.config = config or TrainConfig()
        self.user_callbacks = list(callbacks)
        self.process = process
        self.log = None
        self.elastic = False
        self.callbacks: List[Callback] = []
        self._begun: set = set()
        self.buffers_stale = True  # set by every training step; see agree_buffers
        self.best_store: Optional[BestStore] = None   # keep_best: rank 0 writes the best checkpoints here
        self.last_checkpoint: Optional[str] = None    # the newest checkpoint written or resumed from (rank 0)

    @property
    def active_callbacks(self) -> List[Callback]:
        """The callbacks of this rank now: rank-0 ones only while this worker is rank 0 (an elastic reset can
        make another worker rank 0; its rank-0 callbacks begin then), ``all_ranks`` ones always."""
        chosen = [c for c in self.callbacks if c.all_ranks or self.process.rank == 0]
        for cb in chosen:
            if id(cb) not in self._begun:
                self._begun.add(id(cb))
                cb.on_train_begin(self)
        return chosen

    def agree_buffers(self) -> None:
        """Buffers (BatchNorm statistics) the mean over ranks, unless no step ran since they last were: the
        end of an epoch checks, evaluates and commits in a row, and pays for one grouped allreduce."""
        if self.buffers_stale and not self.config.sync_batchnorm:  # synchronised statistics agree already
            self.adapter.sync_buffers()
        self.buffers_stale = False

    # ---- helpers -------------------------------------------------------------------------------
    def _agree(self, compute):
        """Run ``compute`` on rank 0 and give every rank its result; an HvdkitError fails every rank."""
        outcome = None
        if self.process.rank == 0:
            try:
                outcome = ("ok", compute())
            except HvdkitError as e:
                outcome = ("error", str(e))
        kind, value = self.process.broadcast_object(outcome)
        if kind == "error":
            raise StoppedOnEveryRank(value)  # every rank got the same verdict: none waits, none is to blame
        return value

    def check_same_parameters(self, when: str, buffers: bool = True) -> None:
        """Fail loudly, on every rank, naming the rank and the tensor, if any rank's parameters differ
        (and, with ``buffers``, the buffers :meth:`Adapter.sync_buffers` has just made equal)."""
        everyone = self.process.allgather_object(self.adapter.parameter_checksums(buffers=buffers))
        reference = dict(everyone[0])
        trained = {name for name, _ in self.adapter.parameter_checksums(buffers=False)}
        for rank, sums in enumerate(everyone[1:], start=1):
            bad = [name for name, value in sums if reference.get(name) != value]
            if bad or len(sums) != len(reference):
                first = bad[0] if bad else "the parameter list"
                cause = ("rank {rank} built a different model (every rank must build the same one)" if not bad else
                         "its gradients are not averaged across ranks (a Horovod Keras helper, a second optimizer, "
                         "or a parameter changed outside the optimizer)" if first in trained else
                         "this buffer is changed outside training and averaging (set it the same on every rank)")
                cause = cause.format(rank=rank)
                raise HvdkitError(
                    f"ranks diverged {when}: rank {rank} differs from rank 0 in {first}"
                    f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''}; likely cause: {cause}")

    def place_rng(self, progress: Dict[str, Any]) -> None:
        """Every rank its own random stream (dropout, augmentation): the one committed for it when the world
        is the one that committed, else a fresh one derived from (seed, rank, global step)."""
        p, states = self.process, progress.get("rng")
        if states and len(states) == p.size:
            self.adapter.set_rng_state(states[p.rank])
        else:
            entropy = [int(self.config.seed), p.rank, int(progress["global_step"])]
            self.adapter.seed_rank(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        # numpy's and Python's global generators (augmentation code often uses them): per rank, not committed
        derived = int(np.random.SeedSequence([int(self.config.seed), p.rank, int(progress["global_step"]), 1])
                      .generate_state(1)[0])
        np.random.seed(derived)
        random.seed(derived)

    def _callbacks(self) -> List[Callback]:
        """Built-in rank-0 side effects, then the user's; which of them run is decided per call (above)."""
        cfg, chosen = self.config, []
        if cfg.progress_bar:
            chosen.append(ProgressBar())
        chosen.append(LogLines(cfg.log_every))
        if cfg.tensorboard_dir:
            chosen.append(TensorBoard(cfg.tensorboard_dir))
        return chosen + self.user_callbacks

    def save_checkpoint(self, store: Optional[CheckpointStore], progress: Dict[str, Any], blob: bytes = None) -> None:
        """Rank 0 writes one durable checkpoint of the current state (``blob`` if already serialised)."""
        if store is not None and self.process.rank == 0:
            blob = blob if blob is not None else self.adapter.state_to_bytes(progress)
            self._saved(store.save(blob, self._meta(progress)), progress)

    def _meta(self, progress: Dict[str, Any]) -> Dict[str, Any]:
        meta = {k: v for k, v in progress.items() if k != "rng"}  # the blob holds the random states
        return dict(meta, world_size=self.process.size, framework=self.adapter.framework)

    def _saved(self, path: str, progress: Dict[str, Any]) -> None:
        self.last_checkpoint = path
        self.log.info(f"checkpoint {path} (epoch {progress['epoch']}, position {progress['position']})")

    def commit_static(self, store: Optional[CheckpointStore], progress: Dict[str, Any]) -> None:
        """Every rank, at a static job's commit: a checkpoint, if there is a store. A sharded optimizer's state is
        written where it lives: each rank its shard, rank 0 the rest and the index last (see
        :mod:`hvdkit.sharded_checkpoint`), with no gather; otherwise rank 0 writes one file."""
        if store is None:
            return
        payload = self.adapter.shard_payload()   # the same answer on every rank: the config says
        if payload is None:
            self.adapter.gather_state()
            self.save_checkpoint(store, progress)
            return
        arrays, index = payload
        p = self.process
        number = p.broadcast_object(store.next_number() if p.rank == 0 else None)
        entries = self._write_shards(store.directory, number, arrays)

        def write_index():
            try:
                return store.save(self.adapter.state_to_bytes(progress, sharded=True), self._meta(progress),
                                  shards=entries, shard_index=index, number=number)
            except OSError as e:   # a full disk on rank 0: the same one line on every rank, as for a shard
                raise HvdkitError(f"rank 0 could not write the checkpoint index into {store.directory} "
                                  f"({e.strerror}); free space there or pass another --checkpoint-dir") from None
        path = self._agree(write_index)
        if p.rank == 0:
            self._saved(path, progress)

    def _write_shards(self, directory: str, number: int, arrays) -> List[Dict[str, Any]]:
        """Every rank: its optimizer shard of checkpoint ``number``; every rank's entry for the index, or the same
        one line on every rank when any rank could not write."""
        p = self.process
        try:
            entry = write_shard(directory, number, p.rank, p.size, arrays)
        except OSError as e:
            entry = (f"rank {p.rank} could not write its optimizer shard into {directory} ({e.strerror}); "
                     "free space there or pass another --checkpoint-dir")
        entries = p.allgather_object(entry)
        failed = next((e for e in entries if isinstance(e, str)), None)
        if failed:
            raise StoppedOnEveryRank(failed)
        return entries

    def offer_best(self, progress: Dict[str, Any], value: float, mode: str) -> Optional[str]:
        """Every rank, after an evaluation with ``keep_best``: the state offered to the best checkpoints; rank 0's
        path of the one written, else None. A sharded optimizer's state in a static job is written where it lives
        (each rank its shard, as :meth:`commit_static` does, once rank 0 has found it among the best): nothing is
        gathered. Otherwise the state is gathered and rank 0 writes one file."""
        p, store, cfg = self.process, self.best_store, self.config
        meta = {k: v for k, v in progress.items() if k != "rng"}
        meta.update(world_size=p.size, framework=self.adapter.framework)
        payload = None if self.elastic else self.adapter.shard_payload()
        if payload is None:
            self.adapter.gather_state()   # every rank: a sharded optimizer's state, whole for a best checkpoint
            if p.rank != 0:
                return None
            return store.offer(self.adapter.state_to_bytes(progress), meta, cfg.monitor, value, mode)
        arrays, index = payload
        number = self._agree(lambda: store.place(int(meta["epoch"]), cfg.monitor, value, mode))
        if number is None:
            return None
        entries = self._write_shards(store.directory, number, arrays)

        def write_index():
            try:
                return store.write(number, self.adapter.state_to_bytes(progress, sharded=True), meta, cfg.monitor,
                                   value, mode, shards=entries, shard_index=index)
            except OSError as e:   # a full disk on rank 0: the same one line on every rank, as for a shard
                raise HvdkitError(f"rank 0 could not write the best checkpoint's index into {store.directory} "
                                  f"({e.strerror}); free space there or pass another --checkpoint-dir") from None
        path = self._agree(write_index)
        return path if p.rank == 0 else None

    def evaluate(self, data) -> Dict[str, float]:
        """Exact metrics over ``data``: each sample counted once (the ranks' shares are disjoint, unpadded).

        Per-batch sums (the loss, argmax hits, the adapter's ``metrics=`` functions) are summed over the share,
        then over ranks, and divided by the sample count; stateful metrics (Keras ``Metric`` objects, compiled
        metrics) add their state variables to the same reduction and are computed from the summed state. One
        allreduce for all of them.
        """
        a, p, cfg = self.adapter, self.process, self.config
        self.agree_buffers()  # BatchNorm statistics: the ranks' mean, so every rank scores with the same model
        feed = a.make_feed(data)
        keys = sorted(a.metric_names())
        totals = dict.fromkeys(keys, 0.0)
        a.reset_eval_state()
        for inputs, targets in feed.eval_batches(p.rank, p.size, cfg.eval_batch_size or cfg.batch_size):
            for key, value in a.eval_batch(inputs, targets).items():
                totals[key] += float(value)
        state = np.asarray(a.eval_state(), dtype=np.float64).ravel()
        summed = p.allreduce_sum(np.concatenate([np.array([totals[k] for k in keys], dtype=np.float64), state]))
        reduced = dict(zip(keys, summed[:len(keys)]))
        count = reduced.pop("count")
        metrics = {("accuracy" if k == "correct" else k): v / max(count, 1) for k, v in reduced.items()}
        stateful = a.eval_results(summed[len(keys):])
        clash = sorted(set(stateful) & {"loss", "samples"})
        if clash:
            raise StoppedOnEveryRank(f"a metric is named {clash[0]}, which evaluation reports itself; rename it")
        metrics.update(stateful)  # a compiled "accuracy" replaces the argmax one (it knows the labels' format)
        metrics["samples"] = int(count)
        return metrics

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, train, eval_data=None) -> FitResult:
        """Train on ``train`` (arrays, a dataset, a tf.data source or a Feed); evaluate on ``eval_data``.

        An exception on one rank ends every rank (see :meth:`_failed`): static jobs within seconds, every
        rank naming the failing one; elastic jobs on every rank with the failing rank's own error line.
        """
        cfg = self.config.validate()
        a = self.adapter
        self.process = p = self.process or a.default_process()
        p.init(seed=cfg.seed, threads=cfg.threads)
        a.attach(p)
        self.log = get_logger(p.rank)
        self.elastic = cfg.elastic if cfg.elastic is not None else os.environ.get("HOROVOD_ELASTIC") == "1"
        p.fixed_world = not self.elastic   # before prepare: one static worker's steps skip Horovod
        self.callbacks, self._begun, self._ended = self._callbacks(), set(), set()
        run = Run(progress=fresh_progress(0, cfg.seed), audit=AuditLog(cfg.audit_dir) if cfg.audit_dir else None)
        if p.rank == 0:   # `hvdkit launch` reads this too: a new fit has begun (see COMPLETE_MARK)
            self.log.info(f"{START_MARK} on {p.size} worker{'s' if p.size > 1 else ''}")
        try:
            train_feed, eval_feed, store, resumed = self._prepare(run, train, eval_data)
        except Exception as e:
            if not self.elastic:
                self._failed(e, run, "before training")
            if p.size == 1:
                raise
            # Elastic: the others are about to sync in Horovod's loop; join them and tell them (the first
            # collective of the sync) instead of leaving them to treat this worker as a lost host.
            self._record_failure(e, run, "before training")
            train_feed = eval_feed = store = resumed = None
        if self.elastic:
            self._fit_elastic(run, store, train_feed, eval_feed, resumed)
        else:
            try:
                a.broadcast_state()
                self.place_rng(run.progress)
                if run.audit:
                    run.audit.start(run.progress["global_step"], p.rank, p.size)
                EpochLoop(self, run, train_feed, eval_feed, lambda: self.commit_static(store, run.progress)).run()
                self._finish(run, resumed)   # static: the loop's last commit wrote the final checkpoint
            except Exception as e:
                self._failed(e, run)
        return run.result

    def _prepare(self, run: Run, train, eval_data):
        """Feeds, checks, the optimizer wrapped, callbacks begun, checkpoints opened: all before any step."""
        a, p, cfg = self.adapter, self.process, self.config
        train_feed = a.make_feed(train)
        eval_feed = a.make_feed(eval_data) if eval_data is not None else None
        check_train_config(train_feed.n, p.size, cfg.batch_size, cfg.accumulation)  # same verdict on every rank
        if eval_feed is not None and eval_feed.n == 0:
            raise HvdkitError("the evaluation dataset is empty; pass a non-empty test split or none")
        run.progress = fresh_progress(train_feed.n, cfg.seed)
        train_feed.record_ids = run.audit is not None
        if cfg.monitor.startswith("eval_") and eval_feed is None and (cfg.keep_best or cfg.early_stopping_patience):
            raise HvdkitError(f"monitor {cfg.monitor} needs evaluation data; pass a test split to fit, or monitor "
                              "the training loss (--monitor loss)")
        a.set_nonfinite(cfg.nonfinite)
        a.prepare(lr_factor=cfg.lr_factor(p.size, 0), accumulation=cfg.accumulation, sync_batchnorm=cfg.sync_batchnorm,
                  clip_grad_norm=cfg.clip_grad_norm, precision=cfg.precision, shard_optimizer=cfg.shard_optimizer)
        self.active_callbacks  # noqa: B018 -- begins this rank's callbacks (on_train_begin) now
        store, resumed = self._open_checkpoints(train_feed.n)
        if resumed:
            run.progress.update(resumed_progress(resumed))
        return train_feed, eval_feed, store, resumed

    # ---- the end of a run, and a rank that fails --------------------------------------------------
    @staticmethod
    def _store_behind(store: CheckpointStore, progress) -> bool:
        return store.newest_step() != int(progress["global_step"])

    def _finish(self, run: Run, resumed, store: Optional[CheckpointStore] = None) -> None:
        """The run's last moments: ``on_train_end`` (rank 0's final side effects, e.g. the metrics file), then
        one collective every rank must reach. Elastic: a worker lost after the final commit rolls everyone back to
        it (training is not repeated) and whoever is rank 0 then runs the side effects it has not run yet (a
        worker lost during the final evaluation or commit rolls back to the previous commit: the rest of the last
        epoch is trained again); static: the job fails instead of ending with exit 0 and missing outputs."""
        run.optimizer_state_bytes = max(self.process.allgather_object(int(self.adapter.optimizer_state_bytes())))
        run.result = self._result(run, resumed)
        # every rank: rank 0 may write the final checkpoint just below, and a sharded optimizer's state is whole
        # after fit (the next fit on this adapter, or a state_to_bytes by the user, starts from it)
        self.adapter.gather_state()
        if store is not None and self.process.rank == 0 and self._store_behind(store, run.progress):
            # elastic: rank 0 was lost before its durable write of the final commit finished, and the others
            # rolled back to that commit; the final checkpoint is written here, once
            self.save_checkpoint(store, run.progress)
        for cb in self.active_callbacks:
            if id(cb) not in self._ended:   # a rollback to the final commit: callbacks that ended stay ended
                cb.on_train_end(self, run.result)
                self._ended.add(id(cb))
        self.process.allreduce_sum(np.zeros(1))
        run.result = self._result(run, resumed)
        if self.process.rank == 0:   # `hvdkit launch` reads this: a worker lost after it does not fail the job
            self.log.info(f"{COMPLETE_MARK}: {run.result.epochs_done} epochs, step {run.result.global_step}, "
                          f"{run.result.world_size} workers; outputs written")

    @staticmethod
    def _traceback(error: BaseException) -> str:
        return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()

    def _failure_line(self, error: BaseException, run: Run, where: Optional[str] = None) -> str:
        """One line naming this rank, where it was, and the error (HvdkitError messages as they are)."""
        where = where or self._where(run)
        what = str(error) if isinstance(error, HvdkitError) else f"{type(error).__name__}: {error}"
        return f"rank {self.process.rank} failed {where}: {what.splitlines()[0] if what else type(error).__name__}"

    def _failed(self, error: BaseException, run: Run, where: Optional[str] = None) -> None:
        """Static job: one rank raised. Its traceback, then Horovod shut down on this rank so every other rank's
        pending collective fails now (not when the launcher notices), and one line on every rank."""
        p = self.process
        if p.is_peer_lost(error):
            said = str(error).strip().splitlines()
            raise RankFailed(f"rank {p.rank} stopped {self._where(run)}: another rank failed or left the job (its own "
                             f"error line is the first in the job's output){'; Horovod: ' + said[0] if said else ''}"
                             ) from error
        if isinstance(error, StoppedOnEveryRank) or p.size == 1:
            raise error  # nobody is left waiting: every rank stops here alike, or there is no other rank
        if isinstance(error, HvdkitError):
            # bad input, usually found alike on every rank (many checks are agreed on): its own line, exit 2. No
            # shutdown: under MPI it finalizes MPI, and a script that catches the error cannot fit again; a rank
            # that alone found it exits, and the launcher ends the job
            raise error
        line = self._record_failure(error, run, where)
        p.abort()
        raise RankFailed(line) from error

    def _where(self, run: Run) -> str:
        progress = run.progress
        if progress["epoch"] >= self.config.epochs:
            return f"after training (step {progress['global_step']})"
        return f"at epoch {progress['epoch'] + 1}, step {progress['global_step']}"

    def _record_failure(self, error: BaseException, run: Run, where: Optional[str] = None) -> str:
        """This rank's error: its traceback logged (not for the user's own HvdkitError message), its one line kept
        in ``run.fatal`` for the other ranks (elastic), and returned."""
        if run.fatal is not None:   # the first error counts; what fails after it (e.g. a snapshot) follows from it
            return run.fatal[0]
        if not isinstance(error, HvdkitError):
            self.log.error(self._traceback(error))
        line = self._failure_line(error, run, where)
        run.fatal = (line, isinstance(error, HvdkitError) and not isinstance(error, RankFailed))
        return line

    def _open_checkpoints(self, n: int):
        """The checkpoint store (or None) and the checkpoint resumed from (or None), loaded into the adapter.

        Static: rank 0 decides and every rank gets its verdict (the broadcast follows). Elastic: no collective
        may run outside Horovod's elastic loop (a worker joining later runs this code while the others wait
        in a sync), so every rank checks for itself and rank 0's state reaches the others through the sync.
        """
        cfg, p = self.config, self.process
        if not cfg.checkpoint_dir:
            return None, None
        agree = (lambda compute: compute()) if self.elastic else self._agree
        directory = agree(lambda: ensure_writable_dir(cfg.checkpoint_dir))
        store = CheckpointStore(directory, keep=cfg.keep_checkpoints, log=self.log.warning,
                                merge=self.adapter.merge_shards)
        if cfg.keep_best:
            self.best_store = BestStore(os.path.join(directory, "best"), keep=cfg.keep_best, log=self.log.warning)
        resumed = agree(lambda: load_latest(store, self.adapter, n, cfg.seed)) if cfg.resume else None
        if resumed:
            self.last_checkpoint = os.path.join(directory, resumed["file"])
            self.log.info(resume_line(resumed, n, p.size))
        return store, resumed

    def _fit_elastic(self, run: Run, store, train_feed, eval_feed, resumed) -> None:
        from .elastic import ElasticState, StateHooks
        a, p, cfg = self.adapter, self.process, self.config

        def set_progress(progress):
            run.progress = progress

        def on_restore(progress):
            run.rolled_back = True
            if run.audit:
                run.audit.rolled_back(progress["global_step"])

        hooks = StateHooks(
            to_bytes=a.state_to_bytes, from_bytes=a.state_from_bytes, broadcast=a.broadcast_state,
            get_progress=lambda: run.progress, set_progress=set_progress, on_restore=on_restore,
            durable=(lambda blob, progress: self.save_checkpoint(store, progress, blob)) if store else None,
            is_final=lambda progress: progress["epoch"] >= cfg.epochs or run.stopped,
            exchange_failures=lambda: self._exchange_failures(run),
            on_error=lambda error: self._record_failure(error, run), is_peer_lost=p.is_peer_lost,
            gather=a.gather_state)
        state = ElasticState(p, hooks, durable_every=cfg.durable_every)
        p.elastic_run(lambda st: self._elastic_body(st, run, train_feed, eval_feed, resumed, store))(state)
        if run.progress["epoch"] < cfg.epochs and not run.stopped:  # never report a cut-short run as done
            raise HvdkitError(f"elastic training ended early at epoch {run.progress['epoch'] + 1}, step "
                              f"{run.progress['global_step']}; see the workers' errors above")

    def _elastic_body(self, state, run: Run, train_feed, eval_feed, resumed, store=None) -> None:
        """One (re)start inside Horovod's elastic loop, right after the state sync.

        A rank that raises an ordinary error (not a lost peer) records its line and shuts Horovod down: the others'
        pending collective fails, every rank rolls back and re-initialises with it still there, and the sync's
        first collective (:meth:`_exchange_failures`) stops every rank with that line (retrying would only fail
        again, or carry on without the failing worker).
        """
        from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
        p = self.process
        self.log = get_logger(p.rank)
        hosts = p.allgather_object(f"{p.hostname}/{p.local_rank}")
        if run.hosts is not None:
            run.resets += 1
            joined, left = sorted(set(hosts) - set(run.hosts)), sorted(set(run.hosts) - set(hosts))
            self.log.info(f"workers {len(run.hosts)} -> {len(hosts)} (joined: {', '.join(joined) or '-'}; "
                          f"left: {', '.join(left) or '-'}); {'rolled back to' if run.rolled_back else 'continuing from'} "
                          f"the commit at epoch {run.progress['epoch'] + 1}, sample {run.progress['position']}, "
                          f"step {run.progress['global_step']}; LR x{self.config.lr_factor(p.size, run.progress['global_step']):g}")
        run.hosts, run.rolled_back, run.checked_first = hosts, False, False
        self.buffers_stale = True  # the same on every rank, a worker that just joined included
        try:
            self.place_rng(run.progress)
            if run.audit:
                run.audit.start(run.progress["global_step"], p.rank, p.size)
            EpochLoop(self, run, train_feed, eval_feed, state.commit).run()
            self._finish(run, resumed, store)
        except (HostsUpdatedInterrupt, StoppedOnEveryRank):
            raise  # StoppedOnEveryRank: raised at the same step on every rank; nobody to roll back for
        except Exception as e:
            if p.is_peer_lost(e):
                raise
            line = self._record_failure(e, run)
            p.abort()
            raise HorovodInternalError(line) from e

    def _exchange_failures(self, run: Run) -> None:
        """Every rank's recorded error line, gathered; the first stops every rank (bad input: HvdkitError, exit 2;
        a bug: RankFailed, exit 1)."""
        failed = [f for f in self.process.allgather_object(run.fatal) if f]
        if failed:
            line, bad_input = failed[0]
            raise (HvdkitError if bad_input else RankFailed)(line)

    def _result(self, run: Run, resumed) -> FitResult:
        p, cfg = self.process, self.config
        return FitResult(
            world_size=p.size, epochs_done=run.progress["epoch"], global_step=run.progress["global_step"],
            global_batch_size=cfg.batch_size * p.size * cfg.accumulation,
            train_samples_per_epoch=run.history[-1]["train_samples"] if run.history else 0,
            samples_trained=run.trained, samples_per_sec=run.trained / run.train_time if run.train_time else 0.0,
            history=run.history, eval=run.eval_metrics, stopped_early=run.stopped, resumed_from=resumed,
            resets=run.resets, rank=p.rank, best=run.progress.get("best"),
            skipped_steps=int(run.progress.get("skipped", 0)), optimizer_state_bytes=run.optimizer_state_bytes)

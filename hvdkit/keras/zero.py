"""ZeRO stage 2 on Horovod for Keras 3: each rank holds 1/N of the optimizer state and of the reduced gradients.

One group (a Keras optimizer has one set of hyperparameters): per optimizer step the locally accumulated gradients
of all trainable variables are flattened (in ``model.trainable_variables`` order) into one float32 vector,
zero-padded to a multiple of the world size and reduce-scattered (averaged), so rank r receives the r-th contiguous
slice only (:mod:`hvdkit.zero` holds the layout: balance is by elements, a variable may be split across shards).
Rank r keeps that slice of the variables as a flat float32 "master" shard variable, stepped by an inner optimizer of
the user's class built from its config (:class:`~hvdkit.keras.adapter.LrScaling` on it: the LR is the schedule's
value times the trainer's factor, as unsharded). The inner optimizer shares the user's ``iterations`` and
``learning_rate`` (the same variables, or schedule), so schedules, Keras callbacks setting the LR and
``optimizer.iterations`` behave as without sharding. The global gradient norm (clipping, the non-finite check) is
the square root of the shards' squared norms summed over ranks: one scalar allreduce. The updated shards are
allgathered and assigned into the model's variables, so every rank's model holds the same values, as unsharded.

Only elementwise optimizers give the same result on a split variable: those in :data:`SHARDABLE`.

Checkpoints and commits hold the optimizer state in the unsharded layout: the arrays the user's optimizer would
hold in ``optimizer.variables`` after ``optimizer.build(model.trainable_variables)`` — the npz keys
``optimizer/{i}`` an unsharded :class:`~hvdkit.keras.KerasAdapter` writes — so they load at any world size,
sharded or not. Building them is a collective (:meth:`ShardedOptimizer.gather`, every rank); a loaded one
(:meth:`ShardedOptimizer.load_full_state`) stays pending until :meth:`ShardedOptimizer.reshard` cuts this rank's
shard out of it for the world size of that moment. The user's optimizer is never built (its slots would be the
full state).

Example (what :class:`~hvdkit.keras.KerasAdapter` does with ``shard_optimizer=True``)::

    sharded = ShardedOptimizer(optimizer, model.trainable_variables, process, clip_grad_norm=1.0)
    sharded.reshard()                                 # this rank's shard; new variables: (re)trace the step
    sharded.step(sharded.flatten(grads))              # inside tf.function: reduce-scatter, step, allgather
    sharded.gather()                                  # every rank (a collective), then on any rank:
    arrays = sharded.full_state()                     # the unsharded optimizer.variables, as numpy
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from typing import Any, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from ..errors import HvdkitError
from ..zero import FlatLayout
from .adapter import LrScaling, UpdateGate
from .process import ZERO_STATE

#: The optimizers whose update is elementwise (each element's slots and step depend on that element alone, and on
#: scalars), so stepping a flat slice equals stepping the whole variables. Exact types: a subclass may not be.
SHARDABLE = (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Adagrad,
             keras.optimizers.RMSprop, keras.optimizers.Adamax, keras.optimizers.Nadam, keras.optimizers.Lion,
             keras.optimizers.Adadelta, keras.optimizers.Ftrl)


def check_shardable(optimizer, variables: Sequence[Any]) -> None:
    """Raise one HvdkitError line when ``optimizer`` over ``variables`` cannot be sharded; nothing otherwise."""
    def refuse(why: str) -> None:
        raise HvdkitError(f"shard_optimizer: {why}")
    if type(optimizer) not in SHARDABLE:
        names = ", ".join(cls.__name__ for cls in SHARDABLE)
        refuse(f"supports the elementwise Keras optimizers ({names}), not {type(optimizer).__name__}: an optimizer "
               "using per-variable quantities (LAMB's trust ratio, Adafactor's factored moments, Muon's "
               "orthogonalised update, a LossScaleOptimizer's scale) would change meaning on a flat shard; use one "
               "of those or drop --shard-optimizer")
    if optimizer.clipnorm:
        refuse("clipnorm clips each variable by its own norm, which a flat shard does not have; use "
               "clip_grad_norm (--clip-grad-norm: the global norm over the shards) or clipvalue")
    if optimizer.global_clipnorm:
        refuse("global_clipnorm would clip each rank's shard by that shard's norm; use clip_grad_norm "
               "(--clip-grad-norm), which clips by the global norm over the shards")
    if optimizer.use_ema:
        refuse("use_ema keeps a moving average of every whole variable, which is not sharded; drop use_ema or "
               "--shard-optimizer")
    if optimizer.loss_scale_factor is not None:
        refuse("loss_scale_factor (float16 loss scaling) is not supported; compute in bf16 (--precision bf16), "
               "which needs no loss scaling")
    if optimizer.gradient_accumulation_steps:
        refuse("the optimizer's gradient_accumulation_steps is not sharded; drop it and set "
               "TrainConfig.accumulation (--accumulation) instead")
    if optimizer.weight_decay and (getattr(optimizer, "_exclude_from_weight_decay", None)
                                   or getattr(optimizer, "_exclude_from_weight_decay_pattern", None) is not None):
        refuse("exclude_from_weight_decay picks variables by identity or name, which a flat shard has neither of; "
               "drop the exclusions (or weight_decay) or --shard-optimizer")
    for v in variables:
        if getattr(v, "overwrite_with_gradient", False):
            refuse(f"variable {v.path} is overwritten with its gradient (float8 training), which is not sharded; "
                   "drop --shard-optimizer")
        if str(v.dtype) != "float32":
            refuse(f"keeps float32 master shards and needs float32 trainable variables ({v.path} is {v.dtype}); "
                   "build the model in float32 (hvdkit.keras.use_precision('bf16') computes in bfloat16 with "
                   "float32 variables)")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of the user's optimizer's variables (as if built): its ``iterations``, its ``learning_rate`` variable,
    slot ``k`` (creation order) of trainable variable ``ref``, or its ``k``-th other scalar (Nadam's u-product)."""
    kind: str
    ref: int = -1
    k: int = -1


def _config(optimizer) -> dict:
    """``optimizer``'s config for a twin of it: the inner optimizer (whose LR is then the user's own variable or
    schedule) or the layout probe. A float LR as a placeholder float (the twin then has an LR variable too); a
    schedule or callable as the object itself (no LR variable, as the user's; and no deserialising)."""
    lr = optimizer._learning_rate
    return dict(optimizer.get_config(), learning_rate=0.001 if _is_variable(lr) else lr)


def _build_recording(optimizer, variables) -> List[Tuple[Any, Any]]:
    """Build ``optimizer`` on ``variables``; (slot variable, its reference variable) in creation order."""
    made = []
    original = optimizer.add_variable_from_reference

    def add_variable_from_reference(reference_variable, name=None, initializer="zeros"):
        slot = original(reference_variable, name=name, initializer=initializer)
        made.append((slot, reference_variable))
        return slot
    optimizer.add_variable_from_reference = add_variable_from_reference
    optimizer.build(list(variables))
    return made


def _is_variable(value) -> bool:
    return isinstance(value, keras.Variable)


def checkpoint_layout(optimizer, count: int) -> Tuple[List[Entry], List[np.ndarray]]:
    """What ``optimizer.variables`` would be after ``build`` on ``count`` trainable variables, found by building a
    probe of the same class and config on ``count`` one-element stand-ins (no full-size slot is made); and each
    entry's fresh value in the probe (a slot's is its initializer's, the same for every element)."""
    probe = type(optimizer).from_config(_config(optimizer))
    stand_ins = [keras.Variable(np.zeros((1,), np.float32), name=f"hvdkit_probe_{i}") for i in range(count)]
    index = {id(v): i for i, v in enumerate(stand_ins)}
    slots, seen = {}, {}
    for slot, reference in _build_recording(probe, stand_ins):
        ref = index[id(reference)]
        slots[id(slot)] = Entry("slot", ref, seen.get(ref, 0))
        seen[ref] = seen.get(ref, 0) + 1
    entries, fresh, scalars = [], [], 0
    for v in probe.variables:
        if id(v) in slots:
            entry = slots[id(v)]
        elif v is probe._iterations:
            entry = Entry("iterations")
        elif v is probe._learning_rate:
            entry = Entry("learning_rate")
        else:
            entry, scalars = Entry("scalar", k=scalars), scalars + 1
        entries.append(entry)
        fresh.append(np.array(v.numpy()))
    if len({seen.get(i, 0) for i in range(count)}) > 1:
        raise HvdkitError(f"shard_optimizer: {type(optimizer).__name__} gives its variables different numbers of "
                          "slots, which a flat shard cannot hold; drop --shard-optimizer")
    return entries, fresh


class _UpdateRoute:
    """The user's optimizer's ``_backend_update_step`` stays the one place every update passes, sharded or not: the
    inner optimizer's update step calls it, and while a sharded step is traced it runs the inner optimizer's own.
    Hooks on it (tests/workers/lr_checks.py reads the applied LR there) see each sharded update and its LR.
    Installed once per user optimizer; an unsharded use of that optimizer later goes its own way."""

    def __init__(self, optimizer):
        own = optimizer._backend_update_step
        self.target, self.active = None, False

        def update(grads, trainable_variables, learning_rate):
            if self.active:
                return self.target(grads, trainable_variables, learning_rate)
            return own(grads, trainable_variables, learning_rate)
        optimizer._backend_update_step = update
        optimizer._hvdkit_update_route = self

    @classmethod
    def of(cls, optimizer) -> "_UpdateRoute":
        return getattr(optimizer, "_hvdkit_update_route", None) or cls(optimizer)

    @contextlib.contextmanager
    def sharded(self):
        self.active = True   # at trace time, like LrScaling.applying
        try:
            yield
        finally:
            self.active = False


def _internal(message: str) -> HvdkitError:
    return HvdkitError(f"internal error in the sharded optimizer: {message}; please report it")


_FROM_OPTIMIZER = object()   # the initial state: the user's optimizer's (its variables if built, else fresh)


class ShardedOptimizer:
    """The user's Keras ``optimizer`` stepped in shards of ``variables`` over ``process``' ranks; see the module
    docstring.

    compression: "fp16" halves the reduce-scatter's bytes. clip_grad_norm: clip by the global norm (None: no).
    check_finite: skip the update on every rank when that norm is non-finite (:class:`UpdateGate` on the inner
    optimizer; ``iterations`` still counts the step). accumulate: micro-batches summed in the graph per update
    (:meth:`accumulate_or_step`, for ``model.fit``; the loop sums them itself). state: the unsharded state to start
    from (arrays in :func:`checkpoint_layout` order, or None for fresh); by default the user's optimizer's.
    """

    def __init__(self, optimizer, variables, process, compression: str = "none",
                 clip_grad_norm: Optional[float] = None, check_finite: bool = False, accumulate: int = 1,
                 state: Any = _FROM_OPTIMIZER):
        variables = list(variables)
        check_shardable(optimizer, variables)
        self.optimizer, self.variables, self.process = optimizer, variables, process
        self.compression, self.clip_grad_norm, self.check_finite = compression, clip_grad_norm, check_finite
        self.accumulate = int(accumulate)
        self.sizes = [int(np.prod(v.shape)) for v in variables]
        self.entries, self._fresh = checkpoint_layout(optimizer, len(variables))
        self.slot_kinds = max([e.k + 1 for e in self.entries if e.kind == "slot"], default=0)
        # shared by every inner optimizer (one per placement): the trainer's LR factor, the checked norm, and a count
        # of sharded updates (a gathered state is stale once it moved)
        self.lr_factor = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="hvdkit_zero_lr_factor")
        self.norm = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="hvdkit_zero_grad_norm")
        self.updates = tf.Variable(0, trainable=False, dtype=tf.int64, name="hvdkit_zero_updates")
        self.micro = tf.Variable(0, trainable=False, dtype=tf.int64, name="hvdkit_zero_micro_batches")
        self._route = _UpdateRoute.of(optimizer)
        self.layout: Optional[FlatLayout] = None
        self.inner = self.master = self.accumulator = None
        self.slots: List[Any] = []      # the inner optimizer's slot variables, one per slot kind
        self.scalars: List[Any] = []    # its other variables (Nadam's u-product)
        self._placed: Optional[Tuple[int, int]] = None
        self._version = 0
        self._known: Optional[Tuple[Tuple[int, int], Optional[List[np.ndarray]]]] = None   # (key, state)
        self._pending = True            # the known state is not in the shards yet
        if state is _FROM_OPTIMIZER:
            state = [np.array(v.numpy()) for v in optimizer.variables] if optimizer.built else None
        try:
            self.load_full_state(state)
        except ValueError as e:
            raise HvdkitError(f"shard_optimizer: the optimizer was built already on other variables ({e}); pass a "
                              "fresh optimizer") from None

    # ---- the step (inside tf.function) -----------------------------------------------------------------------
    def flatten(self, grads) -> tf.Tensor:
        """The gradients (one per variable, None for none) as one padded float32 vector."""
        parts = [tf.reshape(tf.cast(tf.zeros(v.shape) if g is None else tf.convert_to_tensor(g), tf.float32), [-1])
                 for g, v in zip(grads, self.variables)]
        padding = self.layout.padded - self.layout.total
        return tf.concat(parts + ([tf.zeros([padding], tf.float32)] if padding else []), axis=0)

    def step(self, flat: tf.Tensor) -> None:
        """Reduce-scatter the local gradient vector ``flat``, clip it by the global norm, step the shard (skipped
        when that norm is non-finite and ``check_finite``), allgather the shards into the model's variables."""
        shard = self.process.reducescatter_average(flat, compression=self.compression)
        shard = tf.cast(shard, tf.float32)
        if self.clip_grad_norm is not None or self.check_finite:
            norm = tf.sqrt(self.process.allreduce_sum_tensor(tf.reduce_sum(tf.square(shard))))
            if self.check_finite:
                self.norm.assign(norm)
            if self.clip_grad_norm is not None:   # as tf.clip_by_global_norm (the unsharded adapters' clip)
                clip = tf.constant(self.clip_grad_norm, tf.float32)
                shard = shard * (clip * tf.minimum(1.0 / norm, 1.0 / clip))
        self.master.assign(self._my_slice())   # the variables may have been assigned since (a load, a broadcast)
        with self._route.sharded():
            self.inner.apply([shard], [self.master])
        full = self.process.allgather(tf.convert_to_tensor(self.master))
        for v, at, size in zip(self.variables, self.layout.offsets, self.sizes):
            v.assign(tf.reshape(full[at:at + size], v.shape))
        self.updates.assign_add(1)

    def accumulate_or_step(self, grads) -> None:
        """``model.fit``'s per-micro-batch apply: add the gradients to a local flat accumulator; every
        ``accumulate``-th call step with the mean of the last ``accumulate`` (as Keras' own accumulation)."""
        flat = self.flatten(grads)
        if self.accumulate == 1:
            self.step(flat)
            return
        k = self.accumulate

        def update():
            self.step((flat + self.accumulator) / k)
            self.accumulator.assign(tf.zeros_like(flat))
            return tf.constant(True)

        def hold():
            self.accumulator.assign_add(flat)
            return tf.constant(False)
        tf.cond(tf.equal((self.micro + 1) % k, 0), update, hold)
        self.micro.assign_add(1)

    def reset_accumulation(self) -> None:
        """Before ``model.fit`` runs steps: no micro-batch held (a rollback may have cut a step short)."""
        self.micro.assign(0)
        if self.accumulator is not None:
            self.accumulator.assign(tf.zeros_like(self.accumulator))

    def _my_slice(self) -> tf.Tensor:
        pieces = self.layout.pieces(self.process.rank)
        parts = [tf.reshape(tf.convert_to_tensor(self.variables[p.index]), [-1])[p.start:p.stop] for p in pieces]
        padding = self.layout.shard_size - sum(p.length for p in pieces)
        return tf.concat(parts + ([tf.zeros([padding], tf.float32)] if padding else []), axis=0)

    def last_step(self) -> Tuple[bool, Optional[float]]:
        """(False if the last update was skipped as non-finite, its global gradient norm), or (True, None)."""
        if not self.check_finite:
            return True, None
        norm = float(self.norm.numpy())
        return math.isfinite(norm), norm

    # ---- placing the shards ----------------------------------------------------------------------------------
    def needs_reshard(self) -> bool:
        """True after a load, or when the world changed since the shards were cut (call :meth:`reshard`)."""
        return self.inner is None or self._pending or self._placed != (self.process.rank, self.process.size)

    def reshard(self) -> bool:
        """Cut this rank's shards for the current world size out of the unsharded state known now (loaded, or
        gathered since the last update). No collective. True when it made new variables (a traced step that uses
        the old ones must be traced again)."""
        if not self.gathered():
            raise _internal(f"the state was laid out for {self._placed} (rank, size) and not gathered since the "
                            f"last update, so it cannot be resharded for {(self.process.rank, self.process.size)}")
        state = self._known[1]
        rank, world = self.process.rank, self.process.size
        renewed = state is None or self.inner is None or self._placed != (rank, world)
        if renewed:
            self._new_inner(FlatLayout(self.sizes, world))
        if state is not None:
            self._apply_state(state, rank)
        self._placed, self._pending = (rank, world), False
        return renewed

    def _new_inner(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.master = keras.Variable(np.zeros(layout.shard_size, np.float32), name="hvdkit_zero_master")
        inner = type(self.optimizer).from_config(_config(self.optimizer))
        own = [inner._iterations, inner._learning_rate]
        # the user's iterations and LR (variable or schedule) drive the inner optimizer: one step count, one LR
        object.__setattr__(inner, "_iterations", self.optimizer._iterations)
        object.__setattr__(inner, "_learning_rate", self.optimizer._learning_rate)
        for v in own:
            if _is_variable(v):
                inner._untrack_variable(v)   # unused now: not state, not counted
        made = _build_recording(inner, [self.master])
        self.slots = [slot for slot, _ in made]
        self.scalars = [v for v in inner.variables if all(v is not s for s in self.slots)]
        wanted = sum(1 for e in self.entries if e.kind == "scalar")
        if len(self.slots) != self.slot_kinds or len(self.scalars) != wanted:
            raise _internal(f"{type(inner).__name__} built {len(self.slots)} slots and {len(self.scalars)} other "
                            f"variables on a shard, expected {self.slot_kinds} and {wanted}")
        route = self._route
        route.target = inner._backend_update_step
        optimizer = self.optimizer
        inner._backend_update_step = lambda grads, variables, lr: optimizer._backend_update_step(grads, variables, lr)
        LrScaling.of(inner).factor = self.lr_factor
        if self.check_finite:
            UpdateGate.of(inner).norm = self.norm
        self.accumulator = (tf.Variable(tf.zeros([layout.padded], tf.float32), trainable=False,
                                        name="hvdkit_zero_accumulator") if self.accumulate > 1 else None)
        self.inner = inner

    def _apply_state(self, state: List[np.ndarray], rank: int) -> None:
        shards = [np.zeros(self.layout.shard_size, np.float32) for _ in range(self.slot_kinds)]
        where = {(e.ref, e.k): i for i, e in enumerate(self.entries) if e.kind == "slot"}
        for piece in self.layout.pieces(rank):
            for k, shard in enumerate(shards):
                value = np.asarray(state[where[(piece.index, k)]]).reshape(-1)
                shard[piece.offset:piece.offset + piece.length] = value[piece.start:piece.stop]
        for slot, shard in zip(self.slots, shards):
            slot.assign(shard)
        for entry, value in zip(self.entries, state):
            if entry.kind == "scalar":
                self.scalars[entry.k].assign(value)
        self._assign_user_scalars(state)

    def _assign_user_scalars(self, state: List[np.ndarray]) -> None:
        for entry, value in zip(self.entries, state):
            if entry.kind == "iterations":
                self.optimizer._iterations.assign(value)
            elif entry.kind == "learning_rate" and _is_variable(self.optimizer._learning_rate):
                self.optimizer._learning_rate.assign(value)

    def user_scalars(self) -> list:
        """The user's optimizer's iterations and float LR's variable: its only state when sharded."""
        lr = self.optimizer._learning_rate
        return [self.optimizer._iterations] + ([lr] if _is_variable(lr) else [])

    # ---- the unsharded view ----------------------------------------------------------------------------------
    def _key(self) -> Tuple[int, int]:
        return self._version, int(self.updates.numpy())

    def gathered(self) -> bool:
        """True when :meth:`full_state` can be called now (no update since the last gather or load)."""
        return self._known is not None and self._known[0] == self._key()

    def will_step(self) -> None:
        """Before updates: drop the gathered state, so that the full state is not held between commits."""
        if not self._pending:
            self._known = None

    def gather(self) -> None:
        """Every rank (a collective, unless nothing changed since the last gather or load): assemble the unsharded
        state for :meth:`full_state`."""
        if self.gathered():
            return
        if self.needs_reshard():
            raise _internal("gather after a resize or a load without a reshard")
        world, shard, kinds = self.process.size, self.layout.shard_size, self.slot_kinds
        per_kind = np.zeros((kinds, 0), np.float32)
        if kinds:
            local = tf.concat([tf.convert_to_tensor(s) for s in self.slots], axis=0)   # [kinds * shard]
            everything = np.asarray(self.process.allgather(local, name=ZERO_STATE))
            per_kind = everything.reshape(world, kinds, shard).transpose(1, 0, 2).reshape(kinds, world * shard)
        state = []
        for entry in self.entries:
            if entry.kind == "slot":
                at, size = self.layout.offsets[entry.ref], self.sizes[entry.ref]
                state.append(per_kind[entry.k, at:at + size].reshape(tuple(self.variables[entry.ref].shape)).copy())
            elif entry.kind == "scalar":
                state.append(np.array(self.scalars[entry.k].numpy()))
            elif entry.kind == "iterations":
                state.append(np.array(self.optimizer._iterations.numpy()))
            else:
                state.append(np.array(self.optimizer._learning_rate.numpy()))
        self._known = (self._key(), state)

    def full_state(self) -> List[np.ndarray]:
        """The user's optimizer's variables as if unsharded (numpy, :func:`checkpoint_layout` order), as of the last
        :meth:`gather` or load; an internal error if an update ran since."""
        if not self.gathered():
            raise HvdkitError("the sharded optimizer state was not gathered since the last update: call "
                              "adapter.gather_state() on every rank (a collective) before adapter.state_to_bytes()")
        return self._known[1] if self._known[1] is not None else self._materialise_fresh()

    def known_state(self) -> Optional[List[np.ndarray]]:
        """As :meth:`full_state`, but None for a fresh state (cheap to broadcast)."""
        if not self.gathered():
            raise _internal("the optimizer state was not gathered since the last update")
        return self._known[1]

    def _materialise_fresh(self) -> List[np.ndarray]:
        state = []
        for entry, fresh in zip(self.entries, self._fresh):
            if entry.kind == "slot":
                state.append(np.full(tuple(self.variables[entry.ref].shape), fresh.reshape(-1)[0], fresh.dtype))
            elif entry.kind == "iterations":
                state.append(np.array(self.optimizer._iterations.numpy()))
            elif entry.kind == "learning_rate" and _is_variable(self.optimizer._learning_rate):
                state.append(np.array(self.optimizer._learning_rate.numpy()))
            else:
                state.append(fresh)
        return state

    # ---- sharded checkpoints (hvdkit.sharded_checkpoint) ------------------------------------------------------
    def payload(self) -> Tuple[dict, dict]:
        """This rank's slice of each slot kind's flat vector (``"slot<k>"``) and the index that rebuilds the
        unsharded slot arrays (``"optimizer/<i>"``, :func:`checkpoint_layout` order) from every rank's. No
        collective."""
        if self.needs_reshard():
            raise _internal("a sharded checkpoint before this rank's shards were placed")
        arrays = {f"slot{k}": np.array(slot.numpy()) for k, slot in enumerate(self.slots)}
        rows = [{"key": f"optimizer/{i}", "flat": f"slot{e.k}", "offset": self.layout.offsets[e.ref],
                 "shape": list(self.variables[e.ref].shape)} for i, e in enumerate(self.entries) if e.kind == "slot"]
        return arrays, {"world": self.process.size, "flats": {name: self.layout.padded for name in arrays},
                        "assemble": rows}

    def other_state(self) -> dict:
        """The unsharded optimizer arrays that are not slots (``"optimizer/<i>"``: iterations, the LR variable,
        other scalars), the same on every rank."""
        found = {}
        for i, entry in enumerate(self.entries):
            if entry.kind == "scalar":
                found[f"optimizer/{i}"] = np.array(self.scalars[entry.k].numpy())
            elif entry.kind == "iterations":
                found[f"optimizer/{i}"] = np.array(self.optimizer._iterations.numpy())
            elif entry.kind == "learning_rate":
                found[f"optimizer/{i}"] = np.array(self.optimizer._learning_rate.numpy())
        return found

    def load_full_state(self, state: Optional[Sequence[np.ndarray]]) -> None:
        """Take an unsharded state (arrays in :func:`checkpoint_layout` order; None: fresh): the iterations and LR
        now, the rest at the next :meth:`reshard`. Raises ValueError when it does not fit."""
        if state is not None:
            state = [np.asarray(a) for a in state]
            if len(state) != len(self.entries):
                raise ValueError(f"{len(state)} saved optimizer variables, this one has {len(self.entries)}")
            for i, (entry, value) in enumerate(zip(self.entries, state)):
                want = tuple(self.variables[entry.ref].shape) if entry.kind == "slot" else self._fresh[i].shape
                if tuple(value.shape) != tuple(want):
                    raise ValueError(f"optimizer variable {i} has shape {tuple(value.shape)}, expected {tuple(want)}")
            self._assign_user_scalars(state)
        self._version += 1
        self._known = (self._key(), state)
        self._pending = True

    def state_bytes(self) -> int:
        """Bytes of the optimizer state this rank holds (its shard's slots, the scalars); 0 before the first
        reshard."""
        if self.inner is None:
            return 0
        held = self.slots + self.scalars + self.user_scalars()
        return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in held))


def merge_blob(blob: bytes, arrays: dict) -> bytes:
    """A sharded checkpoint's rank-0 blob with its unsharded slot arrays put back (``arrays``: keyed
    ``"optimizer/<i>"``, see :meth:`ShardedOptimizer.payload`): the npz an unsharded run writes."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as saved:
        merged = {name: saved[name] for name in saved.files}
    merged.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **merged)
    return buffer.getvalue()

"""ZeRO stage 2 on Horovod for torch: each rank holds 1/N of the optimizer state and of the reduced gradients.

Per optimizer step, per param group: the locally accumulated gradients are flattened (in the group's order) into
one float32 vector, zero-padded to a multiple of the world size, and reduce-scattered (averaged), so rank r
receives the r-th contiguous slice only (see :mod:`hvdkit.zero` for the layout: balance is by elements, a
parameter may be split across shards). Rank r keeps the matching slice of the parameters as a flat float32
"master" shard; an inner optimizer of the user's class and hyperparameters steps those shards (the LR and every
other hyperparameter read from the user's param groups at each step, so LR schedulers and the trainer's factor
apply). The global gradient norm (clipping, the non-finite check) is the square root of the shards' squared norms
summed over ranks: one scalar allreduce. The updated shards are allgathered and copied into the model's
parameters, so every rank's model holds the updated float32 values, as without sharding.

Only elementwise optimizers give the same result on a split tensor: those in :data:`SHARDABLE`.

The unsharded view of the state (``full_state_dict``: the user's optimizer's ``state_dict`` as if it had stepped
every parameter itself) is what checkpoints, commits and broadcasts hold, so they load at any world size and
into an unsharded run. Building it is a collective (:meth:`ShardedOptimizer.gather`, every rank); loading one
(:meth:`ShardedOptimizer.load_full_state_dict`) keeps it pending until :meth:`ShardedOptimizer.reshard` (or the
next step) cuts this rank's shard out of it for the world size of that moment.

Example::

    sharded = ShardedOptimizer(optimizer, process)       # the user's optimizer; it never steps itself
    sharded.reshard()                                    # this rank's shard of its state
    loss.backward()                                      # plain backward passes: gradients stay local
    finite, norm = sharded.step(clip_grad_norm=1.0, check_finite=True)
    sharded.gather()                                     # every rank (a collective), then on any rank:
    torch.save(sharded.full_state_dict(), path)
"""
from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import HvdkitError
from ..zero import FlatLayout

#: The optimizers whose update is elementwise (each element's state and step depend on that element alone, and
#: on scalars), so stepping a flat slice equals stepping the whole tensors.
SHARDABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
             torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)
#: Per-parameter scalars in those optimizers' state (one per group when sharded); every other tensor in their
#: state has one value per parameter element.
SCALAR_STATE = ("step", "mu_product")


def check_shardable(optimizer, model: torch.nn.Module, op: str) -> None:
    """Raise one HvdkitError line when ``optimizer``/``model``/``op`` cannot be sharded; nothing otherwise."""
    if op == "adasum":
        raise HvdkitError("shard_optimizer needs op='average': Adasum combines the ranks' whole gradients, which a "
                          "rank holding 1/N of them never has; drop op='adasum' or --shard-optimizer")
    if type(optimizer) not in SHARDABLE:
        names = ", ".join(cls.__name__ for cls in SHARDABLE)
        raise HvdkitError(f"shard_optimizer supports the elementwise torch.optim optimizers ({names}), not "
                          f"{type(optimizer).__name__}: an optimizer using per-tensor quantities (LAMB's or LARS' "
                          "norms, Adafactor's factored moments) would change meaning when a tensor is split over "
                          "ranks; use one of those or drop --shard-optimizer")
    sparse = next((name for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse), None)
    if sparse is not None:
        raise HvdkitError(f"shard_optimizer cannot reduce-scatter sparse gradients ({sparse} has sparse=True); "
                          "build it with sparse=False or drop --shard-optimizer")
    wrong = next((p.dtype for g in optimizer.param_groups for p in g["params"]
                  if p.requires_grad and p.dtype != torch.float32), None)
    if wrong is not None:
        raise HvdkitError(f"shard_optimizer keeps float32 master shards and needs float32 parameters (found "
                          f"{wrong}); keep the model in float32 (pass --precision bf16 to compute in bfloat16)")


def tensor_bytes(state) -> int:
    """Bytes of the tensors in an optimizer's ``state`` (``{param: {key: value}}``)."""
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values() if torch.is_tensor(v))


def _internal(message: str) -> HvdkitError:
    return HvdkitError(f"internal error in the sharded optimizer: {message}; please report it")


class ShardedOptimizer:
    """The user's ``optimizer`` stepped in shards over ``process``' ranks; see the module docstring.

    compression: "fp16" halves the reduce-scatter's bytes (gradients cast to float16 on the wire).
    After :meth:`step` the model's ``.grad`` are None: each rank keeps only its reduced slice.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, process, compression: str = "none",
                 state: Optional[Dict[str, Any]] = None):
        self.optimizer, self.process, self.compression = optimizer, process, compression
        self._params = [p for group in optimizer.param_groups for p in group["params"]]   # torch's numbering
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self.groups: List[List[torch.Tensor]] = [[p for p in group["params"] if p.requires_grad]
                                                 for group in optimizer.param_groups]
        self.layouts: List[FlatLayout] = []
        self.masters: List[torch.Tensor] = []
        self.inner: Optional[torch.optim.Optimizer] = None
        self._placed: Optional[Tuple[int, int]] = None   # (rank, size) the shards were cut for
        self.version = 0                                  # advances with every change of the state
        self._gathered: Optional[Tuple[int, Dict[int, Dict[str, Any]]]] = None  # (version, unsharded state)
        self.load_full_state_dict(state if state is not None else optimizer.state_dict())
        optimizer.state.clear()   # the shards hold the state from now on; the user's optimizer only its groups

    # ---- the step --------------------------------------------------------------------------------------
    def step(self, clip_grad_norm: Optional[float] = None, check_finite: bool = False) -> Tuple[bool, Optional[float]]:
        """Reduce-scatter the local gradients, clip them by the global norm, step the shards, allgather them into
        the model. Returns (False if skipped because the norm is non-finite and ``check_finite``, the norm or
        None when neither clipping nor checking asked for it); the same on every rank."""
        self._ensure_placed()
        flats = [self._flat_grads(params, layout) for params, layout in zip(self.groups, self.layouts)]
        shards = [s.to(torch.float32) for s in
                  self.process.reducescatter_average(flats, compression=self.compression)]
        del flats
        norm = None
        if clip_grad_norm is not None or check_finite:
            # float32 norm per shard (a float64 one costs 50x the time and a full-size temporary), summed in float64
            squares = sum(float(torch.linalg.vector_norm(s)) ** 2 for s in shards)
            norm = math.sqrt(float(self.process.allreduce_sum(np.array([squares]))[0]))
            if check_finite and not math.isfinite(norm):
                return False, norm   # no update and no state change, on every rank alike
            if clip_grad_norm is not None:
                coef = min(clip_grad_norm / (norm + 1e-6), 1.0)   # as clip_grad_norm_ (NaN stays NaN)
                for s in shards:
                    s.mul_(coef)
        with torch.no_grad():
            self._refresh_masters()
            for master, shard, group, inner_group in zip(self.masters, shards, self.optimizer.param_groups,
                                                         self.inner.param_groups):
                master.grad = shard
                inner_group.update((k, v) for k, v in group.items() if k != "params")   # LR incl. the factor
                if inner_group.get("foreach") is None:
                    # one large flat tensor: torch's default (single-tensor) CPU path is 2-3x slower on it here
                    inner_group["foreach"] = True
            self.inner.step()
            for master in self.masters:
                master.grad = None
            gathered = self.process.allgather_tensors(self.masters, name="hvdkit.zero.params")
            self._write_params(gathered)
        self.version += 1
        self._gathered = None   # stale now; dropped so that the full state is not held between commits
        return True, norm

    def _flat_grads(self, params: List[torch.Tensor], layout: FlatLayout) -> torch.Tensor:
        flat = torch.zeros(layout.padded, dtype=torch.float32)
        for p, at in zip(params, layout.offsets):
            if p.grad is None:   # an unused parameter: a zero gradient, as Horovod's optimizer gives it
                continue
            if p.grad.is_sparse:
                raise HvdkitError("shard_optimizer cannot reduce-scatter sparse gradients; build embeddings with "
                                  "sparse=False or drop --shard-optimizer")
            flat[at:at + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None   # ZeRO stage 2: only this rank's reduced slice is kept; freed now, not after the collective
        return flat

    def _refresh_masters(self) -> None:
        """Master shards := this rank's slices of the parameters (equal after a step; a load or broadcast may
        have changed the parameters since)."""
        rank = self.process.rank
        for master, layout, params in zip(self.masters, self.layouts, self.groups):
            for piece in layout.pieces(rank):
                master[piece.offset:piece.offset + piece.length].copy_(
                    params[piece.index].detach().reshape(-1)[piece.start:piece.stop])

    def _write_params(self, gathered: List[torch.Tensor]) -> None:
        for flat, layout, params in zip(gathered, self.layouts, self.groups):
            for p, at in zip(params, layout.offsets):
                p.detach().copy_(flat[at:at + p.numel()].view_as(p))

    # ---- placing the shards -----------------------------------------------------------------------------
    def _ensure_placed(self) -> None:
        """Shards cut for this rank and world size: after a load, or a resize that skipped the broadcast."""
        if self._placed != (self.process.rank, self.process.size):
            self.reshard()

    def reshard(self) -> None:
        """Cut this rank's shards (parameters and state) for the current world size out of the unsharded state
        known now (loaded, or gathered since the last step). No collective."""
        if self._gathered is None or self._gathered[0] != self.version:
            raise _internal(f"the state was laid out for {self._placed} (rank, size) and not gathered since the "
                            f"last step, so it cannot be resharded for "
                            f"{(self.process.rank, self.process.size)}")
        states = self._gathered[1]
        rank, world = self.process.rank, self.process.size
        self.layouts = [FlatLayout([p.numel() for p in params], world) for params in self.groups]
        self.masters = [torch.zeros(layout.shard_size, dtype=torch.float32) for layout in self.layouts]
        groups = self.optimizer.param_groups
        self.inner = type(self.optimizer)(   # lr: a required argument of SGD in older torch; each group has its own
            [dict({k: v for k, v in group.items() if k != "params"}, params=[master])
             for group, master in zip(groups, self.masters)], lr=groups[0]["lr"])
        for master, layout, params in zip(self.masters, self.layouts, self.groups):
            entries = [states.get(self._index[id(p)]) or {} for p in params]
            keys = list(dict.fromkeys(key for entry in entries for key in entry))
            if keys:
                self.inner.state[master] = {key: self._shard_of(key, entries, layout, rank) for key in keys}
        self._placed = (rank, world)
        self._refresh_masters()

    @staticmethod
    def _shard_of(key: str, entries: List[Dict[str, Any]], layout: FlatLayout, rank: int):
        first = next(entry[key] for entry in entries if key in entry)
        if key in SCALAR_STATE or not torch.is_tensor(first):
            # one per group: every parameter's is the same when each got a gradient at every step
            return first.clone() if torch.is_tensor(first) else first
        shard = torch.zeros(layout.shard_size, dtype=first.dtype)
        for piece in layout.pieces(rank):
            value = entries[piece.index].get(key)
            if value is not None:
                shard[piece.offset:piece.offset + piece.length] = value.reshape(-1)[piece.start:piece.stop]
        return shard

    # ---- the unsharded view ------------------------------------------------------------------------------
    def gather(self) -> None:
        """Every rank (a collective, unless nothing changed since the last gather or load): assemble the unsharded
        state for :meth:`full_state_dict`."""
        if self._gathered is not None and self._gathered[0] == self.version:
            return
        if self._placed != (self.process.rank, self.process.size):
            raise _internal("gather after a resize without a reshard")
        tensors, plan = [], []
        for g, master in enumerate(self.masters):
            for key, value in self.inner.state.get(master, {}).items():
                if torch.is_tensor(value) and key not in SCALAR_STATE:
                    tensors.append(value.reshape(-1))
                    plan.append((g, key))
        gathered = self.process.allgather_tensors(tensors, name="hvdkit.zero.state") if tensors else []
        per_element = {}
        for (g, key), flat in zip(plan, gathered):
            per_element.setdefault(g, {})[key] = flat
        states: Dict[int, Dict[str, Any]] = {}
        for g, (master, layout, params) in enumerate(zip(self.masters, self.layouts, self.groups)):
            shard_state = self.inner.state.get(master, {})
            for p, at in zip(params, layout.offsets):
                entry = {}
                for key, value in shard_state.items():
                    if key in per_element.get(g, {}):   # a copy: a view would save the whole flat vector
                        entry[key] = per_element[g][key][at:at + p.numel()].view_as(p).clone()
                    else:
                        entry[key] = value.clone() if torch.is_tensor(value) else value
                if entry:
                    states[self._index[id(p)]] = entry
        self._gathered = (self.version, states)

    def full_state_dict(self) -> Dict[str, Any]:
        """The user's optimizer's ``state_dict`` as if unsharded (per-parameter state, its param groups), as of the
        last :meth:`gather` or load; an internal error if a step ran since."""
        if self._gathered is None or self._gathered[0] != self.version:
            raise HvdkitError("the sharded optimizer state was not gathered since the last step: call "
                              "adapter.gather_state() on every rank (a collective) before adapter.state_to_bytes()")
        return {"state": self._gathered[1], "param_groups": self.optimizer.state_dict()["param_groups"]}

    def load_full_state_dict(self, state: Dict[str, Any]) -> None:
        """Take an unsharded ``state_dict`` of the user's optimizer: its hyperparameters now, its state at the next
        :meth:`reshard` (or step). Raises ValueError when it does not fit these parameters."""
        for index, entry in state["state"].items():
            p = self._params[int(index)] if 0 <= int(index) < len(self._params) else None
            if p is None:
                raise ValueError(f"optimizer state for parameter {index}, which this optimizer does not hold")
            for key, value in entry.items():
                if torch.is_tensor(value) and key not in SCALAR_STATE and value.numel() != p.numel():
                    raise ValueError(f"optimizer state {key} of parameter {index} has {value.numel()} elements, "
                                     f"the parameter {p.numel()}")
        # validates the groups (count and sizes) and sets the hyperparameters; the state stays with us
        self.optimizer.load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        self.version += 1
        self._gathered = (self.version, {int(i): dict(entry) for i, entry in state["state"].items()})
        self._placed = None

    # ---- sharded checkpoints (hvdkit.sharded_checkpoint) ------------------------------------------------------
    def payload(self) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """This rank's slice of each flat state vector (``"g<group>/<key>"``) and the index that rebuilds the
        unsharded state from every rank's: one ``"<parameter index>/<key>"`` array per parameter and per-element
        key. No collective."""
        if self._placed != (self.process.rank, self.process.size):
            raise _internal("a sharded checkpoint before this rank's shards were placed")
        arrays, flats, rows = {}, {}, []
        for g, (master, layout, params) in enumerate(zip(self.masters, self.layouts, self.groups)):
            for key, value in self.inner.state.get(master, {}).items():
                if torch.is_tensor(value) and key not in SCALAR_STATE:
                    name = f"g{g}/{key}"
                    arrays[name] = value.detach().reshape(-1).numpy()
                    flats[name] = layout.padded
                    rows += [{"key": f"{self._index[id(p)]}/{key}", "flat": name, "offset": at, "shape": list(p.shape)}
                             for p, at in zip(params, layout.offsets)]
        return arrays, {"world": self.process.size, "flats": flats, "assemble": rows}

    def scalar_state_dict(self) -> Dict[str, Any]:
        """The unsharded ``state_dict`` without its per-element tensors (those are in :meth:`payload`): each
        parameter's scalars (Adam's ``step``), the param groups."""
        states: Dict[int, Dict[str, Any]] = {}
        for master, params in zip(self.masters, self.groups):
            scalars = {k: v for k, v in self.inner.state.get(master, {}).items()
                       if not torch.is_tensor(v) or k in SCALAR_STATE}
            for p in params:   # a tensor each: shared, torch's Adam would count one step once per parameter
                if scalars:
                    states[self._index[id(p)]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
        return {"state": states, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def gathered(self) -> bool:
        """True when :meth:`full_state_dict` can be called now (nothing stepped since the last gather or load)."""
        return self._gathered is not None and self._gathered[0] == self.version

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state (its shards' state tensors); 0 before the first reshard."""
        return tensor_bytes(self.inner.state) if self.inner is not None else 0


def merge_blob(blob: bytes, arrays: Dict[str, np.ndarray]) -> bytes:
    """A sharded checkpoint's rank-0 blob with its unsharded optimizer state put back (``arrays``: keyed
    ``"<parameter index>/<key>"``, see :meth:`ShardedOptimizer.payload`): the blob an unsharded run writes."""
    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    state = saved["optimizer"]["state"]
    for key, value in arrays.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue()

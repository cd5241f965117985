"""Worker for tests/test_zoo_parallel.py: the model zoo (tests/workers/zoo_models.py) trained on one adapter.

argv: BACKEND OUT_DIR [SCENARIOS], BACKEND one of torch, keras-loop, keras-fit; SCENARIOS a comma list (default:
all that apply to the backend). Each rank writes OUT_DIR/rank{r}.json with what it read back from the framework;
the test asserts. Every run uses lr_scaling="none" and batch 4 per worker; each rank starts from its own model
init (seed 123 + 1000 x rank), so the broadcast from rank 0 must make them equal; one-process references start
from rank 0's init and follow hvdkit.sharding.plan_epoch's sample order at batch world x 4.
"""
import time

STARTED = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hvdkit import HvdkitError, TrainConfig, Trainer  # noqa: E402
from hvdkit.callbacks import Callback  # noqa: E402
from hvdkit.datasets import digits_split  # noqa: E402
from hvdkit.sharding import plan_epoch  # noqa: E402
from zoo_models import SEQ, VOCAB, zoo  # noqa: E402

backend, out_dir = sys.argv[1], sys.argv[2]
COMMON = ["bn_sync", "bn_sync_empty", "bn_sync_empty_dense", "bn_sync_idle_everywhere", "pool_empty", "bn_local",
          "dropout", "optimizers", "token", "regularized"]
ALL = COMMON + ["token_sparse", "reducers"] if backend == "torch" else COMMON
scenarios = sys.argv[3].split(",") if len(sys.argv) > 3 else ALL
Z = zoo(backend)
LAUNCH_RANK = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
BATCH = 4
QUIET = dict(progress_bar=False, lr_scaling="none", seed=0)

# Images: 60 digits -> at 2 workers x batch 4 the last step holds 4 samples, 2 per rank (plain torch
# BatchNorm needs >= 2). Vectors and tokens: 49 samples -> the last step holds 1 sample: rank 0 has it, the
# other ranks have none (at 2 and at 3 workers).
xi, yi, xi_test, yi_test = digits_split(images=True)
XI, YI = Z.images(xi[:60]), yi[:60]
XI_EVAL, YI_EVAL = Z.images(xi_test[:37]), yi_test[:37]
rng = np.random.default_rng(7)
X = rng.normal(size=(49, 6)).astype(np.float32)
Y = rng.integers(0, 3, size=49).astype(np.int64)
XT = Z.tokens(rng.integers(0, VOCAB, size=(49, SEQ)))
YT = rng.integers(0, 3, size=49).astype(np.int64)


def maxdiff(a, b):
    """Largest absolute difference of two (name, array) lists, compared by position."""
    assert len(a) == len(b), (len(a), len(b))
    assert all(x.shape == y.shape for (_, x), (_, y) in zip(a, b)), [(x.shape, y.shape) for (_, x), (_, y) in zip(a, b)]
    diffs = [np.abs(x - y).max() for (_, x), (_, y) in zip(a, b)]
    return float(np.max(diffs)) if diffs else 0.0   # np.max: a NaN anywhere is the answer (Python's max may hide it)


def crc(pairs):
    return zlib.crc32(b"".join(np.ascontiguousarray(v).tobytes() for _, v in pairs))


def values(pairs):
    return [v.ravel().tolist() for _, v in pairs]


def rank_seed():
    return 123 + 1000 * LAUNCH_RANK


TIMES = {"fit": 0.0, "reference": 0.0}


def fit(build, data, cfg, eval_data=None, callbacks=()):
    """Train a fresh model (this rank's own init) with hvdkit; (model, adapter, result, init params)."""
    started = time.perf_counter()
    try:
        return _fit(build, data, cfg, eval_data, callbacks)
    finally:
        TIMES["fit"] += time.perf_counter() - started


def _fit(build, data, cfg, eval_data, callbacks):
    model, opt = build(rank_seed())
    init = Z.params(model)
    adapter = Z.adapter(model, opt)
    result = Trainer(adapter, cfg, callbacks=callbacks).fit(data, eval_data)
    return model, adapter, result, init


def reference(build, data, epochs, world, accumulation=1, stop_after=None):
    """One process, plain framework code, batch world x BATCH, rank 0's init, the plan's sample order."""
    started = time.perf_counter()
    try:
        return _reference(build, data, epochs, world, accumulation, stop_after)
    finally:
        TIMES["reference"] += time.perf_counter() - started


def _reference(build, data, epochs, world, accumulation, stop_after):
    model, opt = build(123)
    x, y = data
    done = 0
    for epoch in range(epochs):
        for step in plan_epoch(len(x), 0, 1, BATCH * world, QUIET["seed"], epoch, accumulation):
            Z.reference_step(model, opt, step, x, y)
            done += 1
            if stop_after and done >= stop_after:
                return model, opt
    return model, opt


def last_step_samples(n, result):
    """Samples this rank trained in the last step of the last epoch (0: it joined with an empty batch)."""
    last = plan_epoch(n, result.rank, result.world_size, BATCH, QUIET["seed"], result.epochs_done - 1)[-1]
    return sum(len(ids) for ids in last.micro_batches)


def bn_layer_types(model):
    if Z.framework == "torch":
        return sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})
    return sorted({type(layer).__name__ for layer in model.layers if "BatchNorm" in type(layer).__name__})


# ---- 1. BatchNorm CNN, SyncBatchNorm: equal to one process at double batch ----------------------------
def bn_sync():
    cfg = TrainConfig(epochs=2, batch_size=BATCH, sync_batchnorm=True, **QUIET)
    model, adapter, result, _ = fit(Z.bn_cnn, (XI, YI), cfg)
    ref, _ = reference(Z.bn_cnn, (XI, YI), 2, result.world_size)
    fresh, _ = Z.bn_cnn(123)
    return {"world": result.world_size, "steps": result.global_step, "layer_types": bn_layer_types(model),
            "params_maxdiff": maxdiff(Z.params(model), Z.params(ref)),
            "stats_maxdiff": maxdiff(Z.stats(model), Z.stats(ref)),
            "stats_moved": maxdiff(Z.stats(model), Z.stats(fresh)),
            "batches_tracked": Z.batches_tracked(model), "ref_batches_tracked": Z.batches_tracked(ref),
            "params_crc": crc(Z.params(model)), "stats": values(Z.stats(model)),
            "ref_stats": values(Z.stats(ref))}


def _empty_rank(build, sync=True, n=57, accumulation=1):
    """The last step leaves a rank with no sample (by default 57 images: rank 0 holds 1, rank 1 none): ``build``'s
    model trained on the first ``n`` images (with SyncBatchNorm if ``sync``), against one process."""
    data = (XI[:n], YI[:n])
    cfg = TrainConfig(epochs=1, batch_size=BATCH, sync_batchnorm=sync, accumulation=accumulation, **QUIET)
    model, adapter, result, _ = fit(build, data, cfg)
    ref, _ = reference(build, data, 1, result.world_size, accumulation)
    last = plan_epoch(n, result.rank, result.world_size, BATCH, QUIET["seed"], 0, accumulation)[-1]
    return {"world": result.world_size, "steps": result.global_step,
            "last_step_samples": sum(len(ids) for ids in last.micro_batches), "layer_types": bn_layer_types(model),
            "last_micro_batches": [len(ids) for ids in last.micro_batches],
            "params_maxdiff": maxdiff(Z.params(model), Z.params(ref)),
            "stats_maxdiff": maxdiff(Z.stats(model), Z.stats(ref)), "stats_crc": crc(Z.stats(model)),
            "params_crc": crc(Z.params(model))}


def bn_sync_empty():
    """The empty rank with SyncBatchNorm after a convolution."""
    rec = _empty_rank(Z.bn_cnn)
    if Z.framework == "torch":  # without sync, torch BatchNorm cannot train rank 0's 1-sample batch: refused up front
        try:
            fit(Z.bn_cnn, (XI[:57], YI[:57]), TrainConfig(epochs=1, batch_size=BATCH, **QUIET))
            rec["plain_error"] = None
        except HvdkitError as e:
            rec["plain_error"] = str(e)
    return rec


def bn_sync_empty_dense():
    """The same empty rank with SyncBatchNorm after a Dense layer."""
    if Z.framework == "torch":   # (one sample over all ranks leaves torch's BatchNorm1d one value per channel;
        return {"skipped": "Keras only"}   # torch's empty rank is bn_sync_empty's)
    return _empty_rank(Z.bn_mlp)


def bn_sync_idle_everywhere():
    """SyncBatchNorm with accumulation 2 on 49 images: the last step's second micro-batch holds no sample on any
    rank (its moments must be the moving ones, not 0/0)."""
    if Z.framework == "torch":
        return {"skipped": "Keras only"}
    return _empty_rank(Z.bn_cnn, n=49, accumulation=2)


def pool_empty():
    """The same empty rank in a CNN with two convolutions and max pooling (no BatchNorm): where TF's oneDNN
    kernels mishandle zero rows (Conv2D's shape, MaxPool's gradient aborts), Keras' stand-in row must hold."""
    return _empty_rank(Z.pool_cnn, sync=False)


# ---- 2. BatchNorm CNN, no sync: statistics averaged before eval and checkpoint ------------------------------
class LastStepStats(Callback):
    """This rank's running statistics after every step (the last one: before the end-of-epoch averaging)."""
    all_ranks = True

    def __init__(self, model):
        self.model, self.stats = model, None

    def on_step_end(self, trainer, global_step, loss):
        self.stats = Z.stats(self.model)


def bn_local():
    ckpt = os.path.join(out_dir, "ckpt_bn")
    model, opt = Z.bn_cnn(rank_seed())
    adapter = Z.adapter(model, opt)
    seen = LastStepStats(model)
    cfg = TrainConfig(epochs=2, batch_size=BATCH, eval_batch_size=16, checkpoint_dir=ckpt, **QUIET)
    try:
        result = Trainer(adapter, cfg, callbacks=[seen]).fit((XI, YI), (XI_EVAL, YI_EVAL))
    except HvdkitError as e:
        return {"error": str(e)}
    accuracy, loss = Z.evaluate(model, XI_EVAL, YI_EVAL)
    ref, _ = reference(Z.bn_cnn, (XI, YI), 2, result.world_size)  # the SyncBatchNorm result
    rec = {"error": None, "world": result.world_size, "steps": result.global_step,
           "layer_types": bn_layer_types(model), "last_step_stats": values(seen.stats),
           "stats": values(Z.stats(model)), "stats_crc": crc(Z.stats(model)), "params_crc": crc(Z.params(model)),
           "eval": result.eval, "expected_accuracy": accuracy, "expected_loss": loss,
           "params_vs_sync_reference": maxdiff(Z.params(model), Z.params(ref))}
    if result.rank == 0:  # rank 0 wrote the checkpoints; its fit returned after the last one
        files = sorted(f for f in os.listdir(ckpt) if f.endswith(".bin"))
        saved = Z.checkpoint_stats(os.path.join(ckpt, files[-1]), model)
        rec.update(ckpt_file=files[-1], ckpt_stats=values(saved), ckpt_stats_maxdiff=maxdiff(saved, Z.stats(model)))
    return rec


# ---- 3. Dropout MLP: parameters agree, each rank its own dropout stream, reproducible -------------------------
def dropout():
    rec = {}
    for attempt in ("first", "again"):
        model, adapter, result, _ = fit(Z.dropout_mlp, (X, Y), TrainConfig(epochs=2, batch_size=BATCH, **QUIET))
        rec[f"mask_{attempt}"] = Z.dropout_mask(model)
        rec[f"params_crc_{attempt}"] = crc(Z.params(model))
    rec["steps"] = result.global_step
    return rec


# ---- 4. Adam / AdamW: optimizer state after one step, equal on every rank and to one process ----------------
def optimizers():
    rec = {}
    for name in ("adam", "adamw"):
        build = lambda seed, name=name: Z.mlp(seed, name)  # noqa: E731
        cfg = TrainConfig(epochs=1, batch_size=BATCH, stop_after_steps=1, **QUIET)
        model, adapter, result, init = fit(build, (X, Y), cfg)
        ref, ref_opt = reference(build, (X, Y), 1, result.world_size, stop_after=1)
        state, ref_state = Z.optimizer_state(adapter.optimizer, model), Z.optimizer_state(ref_opt, ref)
        rec[name] = {"init_crc": crc(init), "global_step": result.global_step,
                     "optimizer_type": type(adapter.optimizer).__name__,
                     "state_names": [n for n, _ in state], "state_crc": crc(state),
                     "state_maxdiff": maxdiff(state, ref_state),
                     "state_absmax": float(max(np.abs(v).max() for n, v in state
                                               if not any(k in n for k in ("step", "iteration", "learning_rate")))),
                     "step_counts": Z.step_counts(adapter.optimizer, model),
                     "ref_step_counts": Z.step_counts(ref_opt, ref),
                     "params_maxdiff": maxdiff(Z.params(model), Z.params(ref))}
    return rec


# ---- 5. LayerNorm + Embedding: equal to one process (a rank with no sample in the last step) ---------------
def token(sparse=False):
    build = lambda seed: Z.token_model(seed, sparse=sparse)  # noqa: E731
    model, adapter, result, _ = fit(build, (XT, YT), TrainConfig(epochs=2, batch_size=BATCH, **QUIET))
    ref, _ = reference(build, (XT, YT), 2, result.world_size)
    rec = {"world": result.world_size, "steps": result.global_step, "samples": result.train_samples_per_epoch,
           "params_maxdiff": maxdiff(Z.params(model), Z.params(ref)), "params_crc": crc(Z.params(model))}
    rec["last_step_samples"] = last_step_samples(len(XT), result)
    if Z.framework == "torch":
        rec["sparse_embedding"] = bool(model.emb.sparse)
    return rec


def token_sparse():
    return token(sparse=True)


# ---- 6/7. Regularized models: Keras kernel_regularizer (and accumulation), torch AdamW weight decay -----------
def regularized():
    rec = {}
    if Z.framework == "torch":
        build = lambda seed: Z.mlp(seed, "adamw", weight_decay=0.1)  # noqa: E731
        model, adapter, result, _ = fit(build, (X, Y), TrainConfig(epochs=2, batch_size=BATCH, **QUIET))
        ref, _ = reference(build, (X, Y), 2, result.world_size)
        plain, _ = reference(lambda seed: Z.mlp(seed, "adamw", weight_decay=0.0), (X, Y), 2, result.world_size)
        rec["adamw"] = {"params_maxdiff": maxdiff(Z.params(model), Z.params(ref)),
                        "unregularized_maxdiff": maxdiff(Z.params(model), Z.params(plain)),
                        "weight_decay": [g["weight_decay"] for g in adapter.optimizer.param_groups],
                        "params_crc": crc(Z.params(model)), "steps": result.global_step}
        return rec
    for accumulation in (1, 2):
        cfg = TrainConfig(epochs=2, batch_size=BATCH, accumulation=accumulation, **QUIET)
        model, adapter, result, _ = fit(Z.reg_mlp, (X, Y), cfg)
        ref, _ = reference(Z.reg_mlp, (X, Y), 2, result.world_size, accumulation)
        rec[f"l2_accumulation{accumulation}"] = {
            "regularization_losses": len(model.losses), "params_maxdiff": maxdiff(Z.params(model), Z.params(ref)),
            "params_crc": crc(Z.params(model)), "steps": result.global_step}
        if accumulation == 1:  # the same run without the regularizer lands far away: the test can tell
            plain, _ = reference(lambda seed: Z.reg_mlp(seed, l2=0.0), (X, Y), 2, result.world_size)
            rec["l2_accumulation1"]["unregularized_maxdiff"] = maxdiff(Z.params(model), Z.params(plain))
    return rec


# ---- 8. torch: the gradient buckets against Horovod's DistributedOptimizer ----------------------------------
def reducers():
    """The same training under reducer="horovod" and reducer="buckets" (hvdkit.torch.buckets), with and without
    fp16 compression: conv-BatchNorm-dropout with Adam, 2 micro-batches a step, gradient clipping, and a layer
    only rank 0 uses (rank 1's gradient for it never comes: its bucket goes out with zeros, last)."""
    import torch
    nn = torch.nn

    class OneRankBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Dropout(0.2), nn.Linear(4 * 8 * 8, 10))
            self.extra = nn.Linear(10, 10)

        def forward(self, x):
            out = self.body(x)
            return self.extra(out) if LAUNCH_RANK == 0 else out

    rec = {}
    for compression in ("none", "fp16"):
        runs = {}
        for reducer in ("horovod", "buckets"):
            torch.manual_seed(rank_seed())
            model = OneRankBranch()
            init = Z.params(model)
            # 1 KiB buckets: several, rank 0's extra layer in the first (launched first on rank 0, at the end on
            # rank 1, which never uses it): the ranks launch the same buckets in different orders
            adapter = Z.Adapter(model, torch.optim.Adam(model.parameters(), lr=0.01), Z.loss_fn,
                                compression=compression, reducer=reducer,
                                **({"bucket_bytes": 1024} if reducer == "buckets" else {}))
            cfg = TrainConfig(epochs=2, batch_size=BATCH, accumulation=2, clip_grad_norm=0.5, **QUIET)
            result = Trainer(adapter, cfg).fit((XI, YI))
            runs[reducer] = {"params": Z.params(model), "steps": result.global_step,
                             "hooked": sum(bool(p._post_accumulate_grad_hooks) for p in model.parameters()),
                             "wrapped": hasattr(adapter.optimizer, "synchronize"),
                             "moved": maxdiff(Z.params(model), init),
                             "buckets": len(adapter._buckets.buckets) if adapter._buckets is not None else 0,
                             "first_bucket": ([tuple(p.shape) for p in adapter._buckets.buckets[0]]
                                              if adapter._buckets is not None else []),
                             "extra_moved": float(np.abs(model.extra.weight.detach().numpy() - init[-2][1]).max())}
        rec[compression] = {"maxdiff": maxdiff(runs["horovod"]["params"], runs["buckets"]["params"]),
                            "params_crc": crc(runs["buckets"]["params"]), "tensors": len(runs["buckets"]["params"]),
                            **{f"{r}_{k}": v for r, run in runs.items() for k, v in run.items() if k != "params"}}
    return rec


record = {"backend": backend, "rank": LAUNCH_RANK, "seconds": {"start": round(time.perf_counter() - STARTED, 2)}}
for name in scenarios:
    started = time.perf_counter()
    try:
        record[name] = globals()[name]()
    except Exception as e:  # every rank raises alike (or the launch fails): the other scenarios still report
        record[name] = {"crash": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    record["seconds"][name] = round(time.perf_counter() - started, 2)
record["seconds"].update({k: round(v, 2) for k, v in TIMES.items()})
with open(os.path.join(out_dir, f"rank{LAUNCH_RANK}.json"), "w") as f:
    json.dump(record, f)

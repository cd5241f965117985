"""The trainer in one process at world size 1 (``LocalProcess``: no launcher, no Horovod collectives).

Commits, rollbacks, host-change syncs, checkpoint resume and callbacks, each compared with an uninterrupted
run or with plain framework code. Elastic restarts are driven through Horovod's own retry loop by raising its
exceptions from a callback, exactly where a lost peer or a host change would surface.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hvdkit import HvdkitError, TrainConfig, Trainer
from hvdkit.audit import check
from hvdkit.callbacks import Callback
from fault_callbacks import RaiseOnce
from hvdkit.sharding import plan_epoch

torch = pytest.importorskip("torch")
from hvdkit.torch import LocalProcess, TorchAdapter  # noqa: E402

RNG = np.random.default_rng(3)
X = RNG.normal(size=(50, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=50).astype(np.int64)
X_EVAL = RNG.normal(size=(21, 6)).astype(np.float32)
Y_EVAL = RNG.integers(0, 3, size=21).astype(np.int64)
QUIET = dict(progress_bar=False, lr_scaling="none", batch_size=4, seed=0)


def model_and_optimizer(seed=11):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def flat(model):
    return np.concatenate([t.detach().numpy().ravel() for t in model.state_dict().values()])


def fit(callbacks=(), model_seed=11, **config):
    model, optimizer = model_and_optimizer(model_seed)
    adapter = TorchAdapter(model, optimizer, torch.nn.functional.cross_entropy)
    trainer = Trainer(adapter, TrainConfig(**dict(QUIET, **config)), callbacks=callbacks, process=LocalProcess())
    return trainer.fit((X, Y), (X_EVAL, Y_EVAL)), model


class Recorder(Callback):
    """Every event, in order, as a tuple."""

    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append(("begin",))

    def on_epoch_begin(self, trainer, epoch, steps):
        self.events.append(("epoch_begin", epoch, steps))

    def on_step_end(self, trainer, global_step, loss):
        self.events.append(("step", global_step))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch_end", epoch, metrics["train_samples"]))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result.global_step))




def test_local_fit_equals_plain_torch_and_evaluates_every_sample():
    result, model = fit(epochs=2)
    reference, optimizer = model_and_optimizer()
    for epoch in range(2):
        for step in plan_epoch(50, 0, 1, 4, 0, epoch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(torch.from_numpy(X[step.micro_batches[0]])),
                                              torch.from_numpy(Y[step.micro_batches[0]])).backward()
            optimizer.step()
    assert np.abs(flat(model) - flat(reference)).max() < 1e-6
    assert result.world_size == 1 and result.rank == 0 and result.global_step == 2 * 13
    with torch.no_grad():
        expected = float((reference(torch.from_numpy(X_EVAL)).argmax(1).numpy() == Y_EVAL).mean())
    assert result.eval["samples"] == 21 and result.eval["accuracy"] == pytest.approx(expected)


def test_callbacks_see_every_event_in_order():
    recorder = Recorder()
    result, _ = fit(callbacks=[recorder], epochs=2)
    steps = 13  # ceil(50 / 4)
    expected = [("begin",)]
    for epoch in range(2):
        expected += [("epoch_begin", epoch, steps)] + [("step", epoch * steps + s) for s in range(1, steps + 1)]
        expected += [("epoch_end", epoch, 50)]
    assert recorder.events == expected + [("end", 26)]
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_tensorboard_scalars_read_back_by_tensorboard_itself(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result, _ = fit(epochs=2, tensorboard_dir=str(tmp_path / "tb"))
    files = os.listdir(tmp_path / "tb")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = events.Scalars("train/step_loss")
    assert [s.step for s in steps] == list(range(1, 27))
    losses = events.Scalars("epoch/loss")
    assert [s.step for s in losses] == [1, 2]
    assert [s.value for s in losses] == pytest.approx([h["loss"] for h in result.history], rel=1e-6)
    assert [s.value for s in events.Scalars("epoch/eval_accuracy")] == pytest.approx(
        [h["eval_accuracy"] for h in result.history], rel=1e-6)
    # a second run into the same directory gets a file of its own and leaves the first as it was (the same second
    # and a name clash are forced in the next test)
    first = (tmp_path / "tb" / files[0]).read_bytes()
    fit(epochs=1, tensorboard_dir=str(tmp_path / "tb"))
    assert len(os.listdir(tmp_path / "tb")) == 2 and (tmp_path / "tb" / files[0]).read_bytes() == first


def test_tensorboard_writer_never_overwrites_flushes_on_time_and_logs_only_numbers(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import hvdkit.callbacks as cb
    monkeypatch.setattr(cb.time, "time", lambda: 1_700_000_000.0)   # the same second for every file
    monkeypatch.setattr(cb, "_FILE_NUMBERS", iter([0, 0, 1]))        # and a clash on the counter
    first = cb.TensorBoard(str(tmp_path))
    first.on_train_begin(None)
    first.on_step_end(None, 1, 0.5)
    first.on_train_end(None, None)
    second = cb.TensorBoard(str(tmp_path))
    second.FLUSH_SECONDS = -1                                          # flush after every step
    second.on_step_end(None, 1, 0.25)
    assert sorted(os.listdir(tmp_path)) == [f"events.out.tfevents.1700000000.{cb.socket.gethostname()}."
                                            f"{os.getpid()}.{n}" for n in (0, 1)]
    written = os.path.getsize(second.writer._records._writer.name)
    second.on_step_end(None, 2, 0.125)
    assert os.path.getsize(second.writer._records._writer.name) > written   # on disk before the epoch ends
    second.on_epoch_end(None, 0, {"loss": np.float32(0.2), "samples": np.int64(7), "stopped": True, "note": "x"})
    second.on_train_end(None, None)
    events = EventAccumulator(str(tmp_path / sorted(os.listdir(tmp_path))[1]))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch/loss", "epoch/samples", "train/step_loss"]
    assert [s.value for s in events.Scalars("train/step_loss")] == [0.25, 0.125]


def test_a_tensorboard_dir_that_is_a_file_stops_the_job_before_training(tmp_path):
    (tmp_path / "file").touch()
    recorder = Recorder()
    with pytest.raises(HvdkitError, match="tensorboard directory .*file is a file, not a directory; pass a "
                                          "directory to --tensorboard-dir"):
        fit(callbacks=[recorder], epochs=1, tensorboard_dir=str(tmp_path / "file"))
    assert not any(event[0] == "step" for event in recorder.events)


def test_tensorboard_in_a_torch_job_does_not_import_tensorflow(tmp_path):
    # tensorboard's own writer opens files through tf.io.gfile: 7 s of CPU and TF's thread pools on rank 0
    code = ("import sys; sys.path.insert(0, 'tests'); import test_trainer_local as t; "
            f"t.fit(epochs=1, tensorboard_dir={str(tmp_path / 'tb')!r}); "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("[]"), done.stdout
    assert len(os.listdir(tmp_path / "tb")) == 1


def test_checkpoints_are_written_and_resume_gives_the_uninterrupted_result(tmp_path):
    _, whole = fit(epochs=3, checkpoint_dir=str(tmp_path / "a"))
    stopped, _ = fit(epochs=3, checkpoint_dir=str(tmp_path / "b"), stop_after_steps=17)
    assert stopped.stopped_early and stopped.global_step == 17
    manifests = sorted(p for p in os.listdir(tmp_path / "b") if p.endswith(".json"))
    newest = json.loads((tmp_path / "b" / manifests[-1]).read_text())
    assert (newest["epoch"], newest["position"], newest["global_step"]) == (1, 16, 17)
    # other initial weights: everything must come from the checkpoint (model, Adam state, position)
    recorder = Recorder()
    resumed, model = fit(callbacks=[recorder], model_seed=99, epochs=3, checkpoint_dir=str(tmp_path / "b"))
    assert {k: resumed.resumed_from[k] for k in ("epoch", "position", "global_step")} == \
        {"epoch": 1, "position": 16, "global_step": 17}
    assert recorder.events[1] == ("epoch_begin", 1, 9)          # the rest of epoch 2: 34 samples, 9 steps
    assert resumed.global_step == 39 and np.abs(flat(model) - flat(whole)).max() == 0.0


def test_a_checkpoint_of_another_dataset_is_refused(tmp_path):
    fit(epochs=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(HvdkitError, match="written for 50 samples and seed 0, not 50 and 7"):
        fit(epochs=2, checkpoint_dir=str(tmp_path), seed=7)


def test_elastic_rollback_restores_the_last_commit_and_trains_each_sample_once(tmp_path):
    from horovod.common.exceptions import HorovodInternalError
    _, whole = fit(epochs=2)
    lost_peer = RaiseOnce(at=8, error=HorovodInternalError("peer lost (simulated)"))
    result, model = fit(callbacks=[lost_peer], epochs=2, elastic=True, commit_every=3, durable_every=2,
                        checkpoint_dir=str(tmp_path / "ckpt"), audit_dir=str(tmp_path / "audit"))
    assert lost_peer.fired and result.resets == 1
    report = check(str(tmp_path / "audit"), 50, 2)
    assert report["ok"], report["problems"]
    assert report["rollbacks"] == 1 and report["dropped"] == 2      # steps 7 and 8 undone, then redone
    # rolled back to the commit at step 6 (model, Adam state, position): the result is the uninterrupted one
    assert np.abs(flat(model) - flat(whole)).max() == 0.0
    durable = [json.loads(p.read_text()) for p in sorted((tmp_path / "ckpt").glob("*.json"))]
    assert durable and all(d["global_step"] % 3 == 0 or d["position"] == 0 for d in durable)


def test_an_elastic_rollback_leaves_one_tensorboard_point_per_step(tmp_path):
    from horovod.common.exceptions import HorovodInternalError
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    lost_peer = RaiseOnce(at=8, error=HorovodInternalError("peer lost (simulated)"))
    result, _ = fit(callbacks=[lost_peer], epochs=2, elastic=True, commit_every=3, tensorboard_dir=str(tmp_path))
    assert lost_peer.fired and result.resets == 1 and result.global_step == 26
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    # steps 7 and 8 were logged, undone and redone: TensorBoard keeps the redone ones only
    assert [s.step for s in events.Scalars("train/step_loss")] == list(range(1, 27))


def test_elastic_host_change_syncs_without_rolling_back(tmp_path):
    from horovod.common.exceptions import HostsUpdatedInterrupt
    _, whole = fit(epochs=2)
    change = RaiseOnce(at=9, error=HostsUpdatedInterrupt(skip_sync=False))
    result, model = fit(callbacks=[change], epochs=2, elastic=True, commit_every=3, audit_dir=str(tmp_path))
    report = check(str(tmp_path), 50, 2)
    assert report["ok"] and report["rollbacks"] == 0 and report["dropped"] == 0, report
    assert result.resets == 1 and np.abs(flat(model) - flat(whole)).max() == 0.0


def test_elastic_user_error_is_not_retried():
    """An ordinary error rolls back once (so every rank learns it through the first collective of the next
    attempt) and then stops every rank with the failing rank's line: no further training step runs."""
    boom = RaiseOnce(at=3, error=ValueError("a bug in the user's callback"))
    seen = Recorder()
    with pytest.raises(HvdkitError, match=r"^rank 0 failed at epoch 1, step 3: ValueError: a bug in the user's callback$"):
        fit(callbacks=[seen, boom], epochs=2, elastic=True)
    assert [e for e in seen.events if e[0] == "step"][-1][1] == 3


def test_resume_continues_the_dropout_stream(tmp_path):
    def dropout_fit(**config):
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
        adapter = TorchAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
        Trainer(adapter, TrainConfig(**dict(QUIET, epochs=2, **config)), process=LocalProcess()).fit((X, Y))
        return flat(model)
    whole = dropout_fit(checkpoint_dir=str(tmp_path / "a"))
    dropout_fit(checkpoint_dir=str(tmp_path / "b"), stop_after_steps=9)
    torch.manual_seed(1234)       # a different global stream: only the checkpoint's state can make them equal
    resumed = dropout_fit(checkpoint_dir=str(tmp_path / "b"))
    assert np.abs(resumed - whole).max() == 0.0
    assert np.abs(dropout_fit() - whole).max() == 0.0   # reproducible from (seed, rank)


def _checkpoints(directory):
    return sorted(p for p in os.listdir(directory) if p.endswith(".json"))


def _rewrite(directory, number, manifest=None, blob=None):
    """Replace checkpoint ``number``'s blob (manifest kept consistent) or its manifest as given."""
    import hashlib
    stem = os.path.join(directory, f"ckpt-{number:08d}")
    if blob is not None:
        with open(stem + ".bin", "wb") as f:
            f.write(blob)
        meta = json.loads(open(stem + ".json").read())
        meta.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        manifest = json.dumps(meta)
    with open(stem + ".json", "w") as f:
        f.write(manifest)


@pytest.mark.parametrize("damage", ["manifest-list", "manifest-no-sha", "bad-pickle", "wrong-framework",
                                    "wrong-shape", "no-progress"])
def test_a_malformed_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage):
    directory = str(tmp_path)
    fit(epochs=2, checkpoint_dir=directory)                  # checkpoints 0 (epoch 1) and 1 (epoch 2)
    newest = 1
    if damage == "manifest-list":
        _rewrite(directory, newest, manifest="[1, 2, 3]")
    elif damage == "manifest-no-sha":
        _rewrite(directory, newest, manifest=json.dumps({"file": "ckpt-00000001.bin", "size": 3}))
    elif damage == "bad-pickle":
        _rewrite(directory, newest, blob=b"not a torch file at all")
    elif damage == "wrong-framework":
        meta = json.loads(open(os.path.join(directory, "ckpt-00000001.json")).read())
        _rewrite(directory, newest, manifest=json.dumps(dict(meta, framework="tensorflow")))
    elif damage == "wrong-shape":
        other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        import io
        buffer = io.BytesIO()
        torch.save({"model": other.state_dict(), "optimizer": {}, "progress": {}, "torch_rng": torch.get_rng_state()},
                   buffer)
        _rewrite(directory, newest, blob=buffer.getvalue())
    else:
        import io
        model, optimizer = model_and_optimizer()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"n": 50},
                    "torch_rng": torch.get_rng_state()}, buffer)
        _rewrite(directory, newest, blob=buffer.getvalue())
    resumed, _ = fit(epochs=3, checkpoint_dir=directory)
    assert resumed.resumed_from["file"] == "ckpt-00000000.bin" and resumed.epochs_done == 3


def test_no_loadable_checkpoint_stops_with_one_line(tmp_path):
    directory = str(tmp_path)
    fit(epochs=1, checkpoint_dir=directory)
    _rewrite(directory, 0, blob=b"garbage")
    with pytest.raises(HvdkitError) as error:
        fit(epochs=2, checkpoint_dir=directory)
    message = str(error.value)
    assert "no usable checkpoint" in message and "ckpt-00000000.bin" in message and "\n" not in message
    assert "UnpicklingError" in message or "does not fit" in message


class LoseAPeerAtTheEnd(Callback):
    """The first on_train_end raises Horovod's lost-peer error, as the final collective would after a worker died."""

    def __init__(self):
        self.calls = 0

    def on_train_end(self, trainer, result):
        from horovod.common.exceptions import HorovodInternalError
        self.calls += 1
        if self.calls == 1:
            raise HorovodInternalError("a peer was lost at the final collective")


def test_elastic_end_rolls_back_to_the_final_commit_and_ends_callbacks_once(tmp_path):
    seen, lose = Recorder(), LoseAPeerAtTheEnd()
    result, _ = fit(callbacks=[seen, lose], epochs=2, elastic=True, checkpoint_dir=str(tmp_path))
    assert result.resets == 1 and result.epochs_done == 2
    steps = [e for e in seen.events if e[0] == "step"]
    assert len(steps) == len({e[1] for e in steps})          # no step trained again: rolled back to the final commit
    assert [e[0] for e in seen.events].count("end") == 1     # a callback that ended is not ended again
    assert lose.calls == 2                                   # the one that had not finished runs again


def test_elastic_final_checkpoint_written_when_rank0_lost_before_its_durable_write(tmp_path, monkeypatch):
    """Rank 0 died before its durable write of the final commit finished; the survivors rolled back to that commit
    (simulated: the final durable write is skipped, then a peer is lost at the end): the final checkpoint is
    written once, at the end."""
    skipped = []
    original = Trainer.save_checkpoint

    def save_checkpoint(self, store, progress, blob=None):
        if progress["epoch"] == 2 and not skipped:
            skipped.append(progress["global_step"])
            return
        original(self, store, progress, blob)
    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    result, _ = fit(callbacks=[LoseAPeerAtTheEnd()], epochs=2, elastic=True, checkpoint_dir=str(tmp_path),
                    durable_every=1000)
    manifests = [json.load(open(tmp_path / name)) for name in _checkpoints(str(tmp_path))]
    finals = [m for m in manifests if m["epoch"] == 2]
    assert skipped and len(finals) == 1 and finals[0]["global_step"] == result.global_step == skipped[0]

"""Atomic, checksummed checkpoints (hvdkit.checkpoint); plain files in tmp_path, no framework."""
import os

import pytest

from hvdkit.checkpoint import CheckpointStore, atomic_write, ensure_writable_dir
from hvdkit.errors import HvdkitError


# ---------------------------------------------------------------- helpers

def ckpt_name(number, ext):
    return f"ckpt-{number:08d}.{ext}"


def temp_files(directory):
    return [name for name in os.listdir(directory) if name.startswith(".tmp-") or name.startswith(".probe-")]


def blob_for(i):
    return f"state {i} ".encode() * (i + 1) + bytes(range(256))


def store_with(tmp_path, count, keep=10, log=None):
    store = CheckpointStore(str(tmp_path), keep=keep, log=log or (lambda msg: None))
    for i in range(count):
        store.save(blob_for(i), {"epoch": i, "position": 10 * i})
    return store


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


class Recorder:
    def __init__(self):
        self.messages = []

    def __call__(self, msg):
        self.messages.append(msg)


# ---------------------------------------------------------------- save / load

def test_roundtrip_bytes_and_meta(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"), keep=3)
    blob = bytes(range(256)) * 3
    path = store.save(blob, {"epoch": 2, "position": 128, "world_size": 4})
    assert path == str(tmp_path / "run" / ckpt_name(0, "bin"))
    loaded, manifest = store.load_latest()
    assert loaded == blob
    assert manifest["epoch"] == 2 and manifest["position"] == 128 and manifest["world_size"] == 4
    assert manifest["size"] == len(blob)
    assert manifest["file"] == ckpt_name(0, "bin")
    assert temp_files(tmp_path / "run") == []


def test_numbers_increase_and_latest_wins(tmp_path):
    store = store_with(tmp_path, 3)
    assert store.numbers() == [0, 1, 2]
    blob, manifest = store.load_latest()
    assert blob == blob_for(2) and manifest["epoch"] == 2
    assert store.verify(1)[0] == blob_for(1)


def test_keep_only_newest_k_on_disk(tmp_path):
    store = store_with(tmp_path, 6, keep=2)
    assert store.numbers() == [4, 5]
    expected = {ckpt_name(n, ext) for n in (4, 5) for ext in ("bin", "json")}
    assert set(os.listdir(tmp_path)) == expected
    assert store.load_latest()[0] == blob_for(5)


def test_keep_one(tmp_path):
    store_with(tmp_path, 3, keep=1)
    assert sorted(os.listdir(tmp_path)) == [ckpt_name(2, "bin"), ckpt_name(2, "json")]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(HvdkitError, match="keep must be >= 1"):
        CheckpointStore(str(tmp_path), keep=0)


def test_empty_or_missing_directory_loads_none(tmp_path):
    assert CheckpointStore(str(tmp_path)).load_latest() is None
    missing = CheckpointStore(str(tmp_path / "not-there"))
    assert missing.numbers() == [] and missing.load_latest() is None


def test_bin_without_manifest_is_not_a_checkpoint(tmp_path):
    store = store_with(tmp_path, 1)
    (tmp_path / ckpt_name(1, "bin")).write_bytes(b"half-written")  # crash before the manifest
    assert store.numbers() == [0]
    assert store.load_latest()[0] == blob_for(0)


# ---------------------------------------------------------------- corruption

def test_truncated_newest_is_detected_by_verify(tmp_path):
    store = store_with(tmp_path, 3)
    truncate(tmp_path / ckpt_name(2, "bin"), 10)
    with pytest.raises(HvdkitError, match="corrupt") as info:
        store.verify(2)
    assert ckpt_name(2, "bin") in str(info.value)


def test_truncated_newest_falls_back_with_warning(tmp_path):
    log = Recorder()
    store = store_with(tmp_path, 3, log=log)
    truncate(tmp_path / ckpt_name(2, "bin"), 10)
    blob, manifest = store.load_latest()
    assert blob == blob_for(1) and manifest["epoch"] == 1
    assert len(log.messages) == 1
    assert "warning" in log.messages[0] and ckpt_name(2, "bin") in log.messages[0]


def test_same_size_bit_flip_is_detected(tmp_path):
    store = store_with(tmp_path, 2)
    path = tmp_path / ckpt_name(1, "bin")
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HvdkitError, match="corrupt"):
        store.verify(1)
    assert store.load_latest()[0] == blob_for(0)


def test_missing_bin_or_broken_manifest_falls_back(tmp_path):
    log = Recorder()
    store = store_with(tmp_path, 3, log=log)
    os.unlink(tmp_path / ckpt_name(2, "bin"))
    (tmp_path / ckpt_name(1, "json")).write_text("{not json")
    with pytest.raises(HvdkitError, match=ckpt_name(2, "bin")):
        store.verify(2)
    assert store.load_latest()[0] == blob_for(0)
    assert len(log.messages) == 2


def test_all_corrupt_raises(tmp_path):
    log = Recorder()
    store = store_with(tmp_path, 2, log=log)
    for n in (0, 1):
        truncate(tmp_path / ckpt_name(n, "bin"), 3)
    with pytest.raises(HvdkitError, match="no usable checkpoint") as info:
        store.load_latest()
    assert "corrupt" in str(info.value)
    assert len(log.messages) == 2


def test_failed_manifest_write_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    store = store_with(tmp_path, 2)
    real_replace = os.replace

    def replace_but_not_manifests(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_but_not_manifests)
    with pytest.raises(OSError):
        store.save(b"new", {"epoch": 9})
    monkeypatch.undo()
    assert store.numbers() == [0, 1]
    assert store.load_latest()[0] == blob_for(1)
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- atomic_write

def test_atomic_write_writes_and_overwrites_without_temp_files(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(str(target), b"first")
    atomic_write(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch, failing):
    target = tmp_path / "file.bin"
    atomic_write(str(target), b"old content")

    def boom(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError):
        atomic_write(str(target), b"new content that must not appear")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_interrupted_midway_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write(str(target), b"old content")
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"]


# ---------------------------------------------------------------- ensure_writable_dir

def test_ensure_writable_dir_creates_nested_dirs(tmp_path):
    path = ensure_writable_dir(str(tmp_path / "a" / "b"))
    assert path == str(tmp_path / "a" / "b")
    assert os.path.isdir(path) and os.listdir(path) == []


def check_one_line_error(path):
    with pytest.raises(HvdkitError) as info:
        ensure_writable_dir(path)
    message = str(info.value)
    assert "\n" not in message
    assert "--checkpoint-dir" in message
    assert os.path.abspath(path) in message


def test_ensure_writable_dir_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    check_one_line_error(str(tmp_path / "file.txt" / "sub"))


def test_ensure_writable_dir_on_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    check_one_line_error(str(tmp_path / "file.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a 0o500 directory")
def test_ensure_writable_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        check_one_line_error(str(ro))
    finally:
        ro.chmod(0o700)


def test_save_into_unusable_dir_raises(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    store = CheckpointStore(str(tmp_path / "file.txt" / "ckpt"))
    with pytest.raises(HvdkitError, match="--checkpoint-dir"):
        store.save(b"x", {})


def test_module_docstring_example(tmp_path):
    store = CheckpointStore(str(tmp_path / "run1"), keep=3)
    store.save(b"...", {"epoch": 1, "position": 0})
    blob, manifest = store.load_latest()
    assert blob == b"..." and manifest["position"] == 0

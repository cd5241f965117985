"""`hvdkit bench` at its smallest sizes: the commands run and write table, JSON and PNG. No timing asserts."""
import json
import sys

from proc import REPO, explain, run


def bench(*args, timeout=600):
    return run([sys.executable, "-m", "hvdkit.cli", "bench", *args], timeout=timeout, cwd=REPO)


def test_allreduce_bench_smallest_size(tmp_path):
    result = bench("allreduce", "--sizes", "4096", "--iters", "2", "--out", str(tmp_path))
    assert result.returncode == 0, explain(result)
    report = json.loads((tmp_path / "allreduce.json").read_text())
    impls = set(report["results"])
    assert {"mpi4py", "torch.distributed gloo", "horovod mpi ops", "horovod gloo ops", "hvdkit default",
            "memcpy (1 process)"} == impls
    assert all(v["4096"]["busbw_GBps"] > 0 for k, v in report["results"].items() if not k.startswith("memcpy"))
    assert "| 4 KiB |" in (tmp_path / "allreduce.md").read_text()
    assert (tmp_path / "allreduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_bench_smallest_size(tmp_path):
    result = bench("train", "--steps", "2", "--batch", "8", "--repeats", "1", "--workers", "1,2",
                   "--out", str(tmp_path))
    assert result.returncode == 0, explain(result)
    report = json.loads((tmp_path / "train.json").read_text())
    assert set(report["results"]) == {"hvdkit-torch", "raw-horovod-torch", "torch-ddp",
                                      "hvdkit-keras", "hvdkit-keras-loop", "raw-horovod-tf", "tf-mwms"}
    for mode, by_workers in report["results"].items():
        assert by_workers["1"]["best"] > 0 and by_workers["2"]["best"] > 0, mode
    assert "hvdkit-torch / torch-ddp @2" in report["ratios"]
    assert "hvdkit-keras / tf-mwms @2" in report["ratios"]
    assert "hvdkit-keras-loop / raw-horovod-tf @2" in report["ratios"]
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hvdkit-torch |" in (tmp_path / "train.md").read_text()

"""`hvdkit bench zero` at its smallest: one round, 2 steps, 2 workers, a small MLP. The command runs, writes its
table, JSON and PNG, and the numbers it measured are sane: at 2 workers the sharded optimizer holds half of Adam's
state (to one element of padding per state tensor), torch's ZeroRedundancyOptimizer half to one whole parameter
(it assigns whole parameters), together exactly the unsharded state; the sharded run keeps no gradients after its
step and a half-size shard during it. No timing asserts beyond samples/s > 0. (At 1 worker every variant is the
unsharded optimizer: tests/test_zero_torch.py runs the sharded one in one process.)"""
import json
import sys

from proc import REPO, explain, run

STEPS, BATCH, WIDTH, DEPTH = 2, 8, 64, 1


def test_zero_bench_smallest_size(tmp_path):
    result = run([sys.executable, "-m", "hvdkit.cli", "bench", "zero", "--workers", "2", "--rounds", "1",
                  "--steps", str(STEPS), "--batch", str(BATCH), "--width", str(WIDTH), "--depth", str(DEPTH),
                  "--out", str(tmp_path)], timeout=600, cwd=REPO)
    assert result.returncode == 0, explain(result)
    report = json.loads((tmp_path / "zero.json").read_text())
    assert report["workers"] == [2] and report["rounds"] == 1
    variants = report["results"]
    assert set(variants) == {"hvdkit", "hvdkit-sharded", "torch-zero"}
    params, largest = report["model"]["params"], report["model"]["largest_param"]
    assert params == (784 * WIDTH + WIDTH) + DEPTH * (WIDTH * WIDTH + WIDTH) + (WIDTH * 10 + 10)
    tensors = report["model"]["param_tensors"]
    unsharded = 2 * 4 * params + 4 * tensors          # Adam: exp_avg, exp_avg_sq per element, one step per tensor

    for variant, by_world in variants.items():
        assert set(by_world) == {"2"}, variant
        for world, row in by_world.items():
            assert row["samples_per_sec"] > 0 and row["peak_rss_bytes"] > 50 << 20, (variant, world, row)
            (only,) = row["runs"]
            assert only["world_size"] == int(world) and len(only["ranks"]) == int(world), (variant, world)
            if variant.startswith("hvdkit"):   # hvdkit's own figure is the largest rank's, from the same tensors
                assert only["hvdkit_optimizer_state_bytes"] == row["state_bytes"], (variant, world, only)
    plain, sharded, zero = (variants[v]["2"] for v in ("hvdkit", "hvdkit-sharded", "torch-zero"))
    assert plain["state_bytes"] == unsharded

    # 2 workers: the sharded optimizer holds 1/2, plus one padding element of each state tensor and its one step
    assert 0 < sharded["state_bytes"] <= unsharded / 2 + 2 * 4 + 4, (sharded["state_bytes"], unsharded)
    # ZeroRedundancyOptimizer: 1/2 up to one whole parameter's state (its unit of balance); every state once
    zero_ranks = [rank["state_bytes"] for rank in zero["runs"][0]["ranks"]]
    assert zero["state_bytes"] <= unsharded / 2 + 2 * 4 * largest + 4, (zero_ranks, unsharded)
    assert sum(zero_ranks) == unsharded and min(zero_ranks) > 0, zero_ranks

    # gradients: unsharded and ZeRO-1 keep every gradient after the step; the sharded run none, and its shard
    # (half, padded) while stepping
    assert plain["grad_bytes_after_step"] == plain["grad_bytes_at_step"] == 4 * params
    assert zero["grad_bytes_after_step"] >= 4 * params
    assert sharded["grad_bytes_after_step"] == 0
    assert sharded["grad_bytes_at_step"] == 4 * -(-params // 2)
    # the sharded run's float32 parameter slice, held all run (reported beside the state, not hidden in it)
    assert sharded["master_bytes"] == 4 * -(-params // 2) and plain["master_bytes"] == zero["master_bytes"] == 0

    table = (tmp_path / "zero.md").read_text()
    assert "| hvdkit-sharded | 2 |" in table and "| torch-zero | 2 |" in table
    assert "| hvdkit-sharded | 2 |" in result.stdout   # the table on stdout too
    assert (tmp_path / "zero.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_bench_refuses_an_unknown_variant(tmp_path):
    result = run([sys.executable, "-m", "hvdkit.cli", "bench", "zero", "--variants", "hvdkit,deepspeed",
                  "--out", str(tmp_path)], timeout=60, cwd=REPO)
    assert result.returncode != 0
    assert "unknown bench zero variants ['deepspeed']" in result.stdout + result.stderr

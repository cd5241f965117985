"""Worker: run a torch example whose loss is NaN on one rank at chosen global steps (argv: SCRIPT [ARGS...]).

HVDKIT_NAN=``rank:step[,step...]``: every ``TorchAdapter`` the script builds gets its loss function wrapped;
on the worker that is rank ``rank`` (HOROVOD_RANK / OMPI_COMM_WORLD_RANK) the training loss of those global
steps (counted per optimizer step, batch-size steps with no accumulation) is multiplied by NaN. The other
ranks' losses stay finite: the non-finite guard must still reach them in the same step.
"""
import os
import runpy
import sys

spec = os.environ["HVDKIT_NAN"]
rank_text, steps_text = spec.split(":")
NAN_RANK, NAN_STEPS = int(rank_text), {int(s) for s in steps_text.split(",")}


def install() -> None:
    import torch
    from hvdkit.torch import adapter as torch_adapter

    original_init = torch_adapter.TorchAdapter.__init__
    original_step = torch_adapter.TorchAdapter.train_step

    def __init__(self, model, optimizer, loss_fn, *args, **kwargs):
        def poisoned(outputs, targets):
            loss = loss_fn(outputs, targets)
            rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
            if torch.is_grad_enabled() and rank == NAN_RANK and self._hvdkit_test_step in NAN_STEPS:
                print(f"nan_loss.py: NaN loss on rank {rank} at step {self._hvdkit_test_step}", file=sys.stderr,
                      flush=True)
                return loss * float("nan")
            return loss
        original_init(self, model, optimizer, poisoned, *args, **kwargs)
        self._hvdkit_test_step = 0

    def train_step(self, micro_batches):
        self._hvdkit_test_step += 1
        return original_step(self, micro_batches)

    torch_adapter.TorchAdapter.__init__ = __init__
    torch_adapter.TorchAdapter.train_step = train_step


if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    install()
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")

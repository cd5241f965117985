"""What a rank's environment holds: ``env_report.py OUT_DIR NAME...`` writes ``OUT_DIR/rank-<rank>.json`` with the
hostname this rank runs on, its rank and the value (or null) of each NAME and of every HOROVOD_*, HVDKIT_* and OMP_*
variable it has.

No Horovod and no framework import (a launch of it takes seconds): the rank comes from the launcher's variables
(mpirun's OMPI_COMM_WORLD_RANK, horovodrun's HOROVOD_RANK). The ranks share OUT_DIR (the namespace hosts share the
filesystem, as a cluster's home directory), so the test reads back what each remote rank saw.
"""
import json
import os
import socket
import sys

PREFIXES = ("HOROVOD_", "HVDKIT_", "OMP_")


def main(out_dir, names):
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK"))
    if rank is None:
        sys.exit("env_report.py: no OMPI_COMM_WORLD_RANK or HOROVOD_RANK: not started by mpirun or horovodrun")
    seen = {name: os.environ.get(name) for name in names}
    seen.update({k: v for k, v in os.environ.items() if k.startswith(PREFIXES)})
    report = {"rank": int(rank), "hostname": socket.gethostname(), "env": seen}
    path = os.path.join(out_dir, f"rank-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)   # whole or absent


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

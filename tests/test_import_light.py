"""`import hvdkit` (and its framework-free core) must not import torch, tensorflow or horovod."""
import subprocess
import sys

CORE = ["hvdkit", "hvdkit.sharding", "hvdkit.trainer", "hvdkit.checkpoint", "hvdkit.launch",
        "hvdkit.cli", "hvdkit.doctor", "hvdkit.config", "hvdkit.callbacks", "hvdkit.adapter",
        "hvdkit.discover_hosts", "hvdkit.zero"]


def test_core_imports_no_framework():
    code = ("import sys\n"
            f"for m in {CORE!r}: __import__(m)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'horovod', 'keras'))\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"framework modules imported by the core: {out.stdout.strip()}"

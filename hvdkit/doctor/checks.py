"""The doctor's judgement: turn probe results and facts into report sections, problems and warnings.

A problem is one line ``<what is wrong>; fix: <how to fix it>`` and fails the doctor; a warning
does not. Each ``check_*`` returns its report section (or nothing) and adds to a :class:`Findings`.

Example::

    >>> findings = Findings()
    >>> check_keras("3.8.0", "0.28.1", findings)
    >>> findings.warnings[0][:40]
    "Keras 3.8.0: Horovod 0.28.1's own Keras "
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .facts import package_version
from .probes import parse_mpirun_version

SETUP_FIX = "run bash mpi/setup.sh (builds Horovod 0.28.1 with PyTorch, TensorFlow, MPI and Gloo)"
OPENMPI_INSTALL = "install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)"
FRAMEWORKS = (("PyTorch", "torch"), ("TensorFlow", "tensorflow"))
TENSOR_OPS = (("NCCL", "nccl_built"), ("DDL", "ddl_built"), ("CCL", "ccl_built"),
              ("MPI", "mpi_built"), ("Gloo", "gloo_built"))


class Findings:
    """Problems (each with its fix) and warnings, in the order the checks found them."""

    def __init__(self) -> None:
        self.problems: List[str] = []
        self.warnings: List[str] = []

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(f"{what}; fix: {fix}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)


# ---- Horovod and what it was built with -------------------------------------------------------------
def check_horovod(results: Dict[str, Dict[str, Any]], installed: Optional[str], found: Findings) -> Dict[str, Any]:
    """The ``horovod`` section from the base and framework probes; ``installed``: its metadata version."""
    base = results["base"]
    answer = base["result"] or {}
    horovod: Dict[str, Any] = {"importable": base["result"] is not None, "error": base["error"],
                               "version": answer.get("version") or installed,
                               "location": answer.get("location"),
                               "frameworks": {"TensorFlow": False, "PyTorch": False, "MXNet": False},
                               "controllers": {"MPI": False, "Gloo": False},
                               "tensor_operations": {op: False for op, _ in TENSOR_OPS},
                               "cuda_built": False, "rocm_built": False, "probes": {}}
    if not horovod["importable"]:
        # One line: the framework probes failed for the same reason, repeating it would be noise.
        found.problem(f"horovod is not importable ({base['error']})", SETUP_FIX)
        return horovod
    horovod["frameworks"]["MXNet"] = bool(answer["extensions"].get("MXNet"))
    loaded = _check_frameworks(horovod, answer["extensions"], results, found)
    _record_build_flags(horovod, loaded, found)
    return horovod


def _check_frameworks(horovod: Dict[str, Any], extensions: Dict[str, bool],
                      results: Dict[str, Dict[str, Any]], found: Findings) -> List[Dict[str, Any]]:
    """Mark each framework whose Horovod extension loads; returns the build flags each one reported."""
    loaded = []
    for label, module in FRAMEWORKS:
        res = results[module]
        horovod["probes"][module] = {"ok": res["result"] is not None, "error": res["error"],
                                     "seconds": res["seconds"]}
        if package_version(module) is None:
            found.warn(f"{label} ({module}) is not installed; hvdkit's {label} adapter is unavailable")
        elif not extensions.get(label):
            flag = "HOROVOD_WITH_PYTORCH" if module == "torch" else "HOROVOD_WITH_TENSORFLOW"
            found.problem(f"Horovod {horovod['version']} was built without {label} support",
                          f"rebuild it with {flag}=1: {SETUP_FIX}")
        elif res["result"] is None:
            found.problem(f"import horovod.{module} fails ({res['error']})",
                          f"rebuild Horovod against the installed {module} {package_version(module)}: {SETUP_FIX}")
        else:
            horovod["frameworks"][label] = True
            loaded.append(res["result"])
    if not loaded and not any(package_version(m) for _, m in FRAMEWORKS):
        found.problem("neither torch nor tensorflow is installed", "pip install -e '.[torch,tensorflow]'")
    return loaded


def _record_build_flags(horovod: Dict[str, Any], loaded: List[Dict[str, Any]], found: Findings) -> None:
    """Tensor operations and controllers; a missing controller is a problem only if an extension loaded."""
    # Built flags are per extension; report the union (they come from one build anyway).
    for flags in loaded:
        for op, key in TENSOR_OPS:
            horovod["tensor_operations"][op] |= bool(flags.get(key))
        horovod["cuda_built"] |= bool(flags.get("cuda_built"))
        horovod["rocm_built"] |= bool(flags.get("rocm_built"))
    horovod["controllers"] = {"MPI": horovod["tensor_operations"]["MPI"],
                              "Gloo": horovod["tensor_operations"]["Gloo"]}
    if not loaded:
        return
    if not horovod["controllers"]["MPI"]:
        found.problem("Horovod was built without MPI (mpirun launches and static horovodrun ones cannot work)",
                      f"{OPENMPI_INSTALL}, then rebuild with HOROVOD_WITH_MPI=1: {SETUP_FIX}")
    if not horovod["controllers"]["Gloo"]:
        found.problem("Horovod was built without Gloo (horovodrun --gloo and elastic runs cannot work)",
                      f"rebuild with HOROVOD_WITH_GLOO=1 (needs cmake): {SETUP_FIX}")


# ---- launchers and MPI --------------------------------------------------------------------------------
def check_horovodrun(launchers: Dict[str, Optional[str]], found: Findings) -> None:
    # The launch lines hvdkit prints say `horovodrun`, so a PATH miss is a problem even when the
    # venv has horovodrun beside its python.
    if launchers["horovodrun"]:
        return
    if launchers["horovodrun_beside_python"]:
        venv_bin = os.path.dirname(launchers["horovodrun_beside_python"])
        found.problem("horovodrun is not on the PATH",
                      f"activate the venv (source {os.path.join(venv_bin, 'activate')}) "
                      f"or export PATH={venv_bin}:$PATH")
    else:
        found.problem("horovodrun is not on the PATH (and not installed beside this python)",
                      f"activate the venv (source .venv/bin/activate) or {SETUP_FIX}")


def check_mpirun(mpirun: Optional[str], res: Optional[Dict[str, Any]], found: Findings) -> Dict[str, Any]:
    """The ``mpi`` section; ``res``: the ``mpirun --version`` result (None when mpirun is not on the PATH)."""
    mpi: Dict[str, Any] = {"mpirun": mpirun, "implementation": None, "version": None, "error": None}
    if not mpirun:
        found.problem("mpirun is not on the PATH", f"{OPENMPI_INSTALL} or run bash mpi/setup.sh")
        return mpi
    mpi.update(parse_mpirun_version(res["stdout"] + "\n"))
    mpi["error"] = res["error"]
    if res["error"]:
        found.problem(f"mpirun --version fails ({res['error']})",
                      "reinstall OpenMPI (apt-get install --reinstall openmpi-bin)")
    return mpi


def check_mpi4py(installed: Optional[str], res: Dict[str, Any], mpirun_impl: Optional[str],
                 found: Findings) -> Dict[str, Any]:
    """The ``mpi4py`` section: the examples and tests use it to check collectives against a second MPI."""
    mpi4py = {"installed": installed is not None, "version": installed,
              "library": None, "mpi_standard": None, "error": None}
    if installed is None:
        found.problem("mpi4py is not installed", "pip install mpi4py (or pip install -e '.[mpi]')")
    elif res["result"] is None:
        mpi4py["error"] = res["error"]
        found.problem(f"mpi4py does not load its MPI library ({res['error']})",
                      "reinstall it against the system MPI: pip install --no-cache-dir --force-reinstall mpi4py")
    else:
        mpi4py.update(version=res["result"]["version"], library=res["result"]["library"],
                      mpi_standard=res["result"]["standard"])
        lib_impl = "Open MPI" if "Open MPI" in mpi4py["library"] else (
            "MPICH" if "MPICH" in mpi4py["library"] else None)
        if lib_impl and mpirun_impl in ("Open MPI", "MPICH") and lib_impl != mpirun_impl:
            found.warn(f"mpi4py uses {lib_impl} but mpirun is {mpirun_impl}; "
                       "ranks launched by this mpirun will not see each other in mpi4py")
    return mpi4py


# ---- the rest of the machine --------------------------------------------------------------------------
def check_keras(keras: Optional[str], horovod_version: Optional[str], found: Findings) -> None:
    # Keras 3 trap: Horovod 0.28.1 predates Keras 3.
    if keras and keras.split(".")[0].isdigit() and int(keras.split(".")[0]) >= 3:
        found.warn(f"Keras {keras}: Horovod {horovod_version or '0.28.1'}'s own Keras helpers "
                   "(horovod.tensorflow.keras.DistributedOptimizer, BroadcastGlobalVariablesCallback, "
                   "DistributedGradientTape) silently stop averaging gradients or raise on Keras 3; "
                   "use hvdkit's Keras adapter (hvdkit.keras) instead")


def check_cpu(cpu: Dict[str, Optional[int]], found: Findings) -> None:
    if (cpu["usable"] or 1) < 2:
        found.warn(f"only {cpu['usable']} usable core(s): -np 2 runs oversubscribe and are slow "
                   "(hvdkit launch adds --oversubscribe for mpirun)")


def check_network(network: Dict[str, Any], found: Findings) -> None:
    if network["gloo_iface_env"] and network["gloo_iface_env"] not in network["interfaces"]:
        found.problem(f"HOROVOD_GLOO_IFACE={network['gloo_iface_env']} names no interface on this host",
                      f"unset it or set it to one of {', '.join(sorted(network['interfaces']))}")
    elif network["source"] != "unavailable" and not network["loopback"]:
        found.problem("no interface holds 127.0.0.1, so single-host horovodrun fails",
                      "bring the loopback up (ip link set lo up)")

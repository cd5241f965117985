"""``hvdkit doctor``: a preflight report to read before launching distributed jobs.

It tells what Horovod was built with (frameworks, controllers, tensor operations), which MPI,
mpi4py, torch, TensorFlow and Keras are installed, the cores, memory and network interfaces Gloo
would use, and whether ``horovodrun`` / ``mpirun`` are on the PATH. Every problem is one line
``problem: <what is wrong>; fix: <how to fix it>``; the exit code is 1 when there is any.

Example::

    $ hvdkit doctor            # readable report, last line "doctor: OK" or "doctor: N problem(s)"
    $ hvdkit doctor --json     # one JSON object with "ok", "problems" and "warnings"

    >>> from hvdkit.doctor import run_doctor
    >>> code = run_doctor(as_json=True)   # prints the report, returns 0 or 1

Modules: ``probes`` (child processes that import Horovod, the frameworks and mpi4py), ``facts``
(what is read in-process: versions, cores, memory, interfaces, launchers), ``checks`` (facts ->
problems and warnings), ``report`` (collect, format, print).

Nothing heavy is imported here: Horovod, torch and TensorFlow are imported only in child
processes (with a timeout), so a framework import that crashes or hangs becomes a reported
problem instead of killing the doctor.
"""
from .checks import SETUP_FIX
from .facts import cpu_facts, launcher_facts, memory_facts, network_facts, package_version
from .probes import PROBE_TIMEOUT, parse_mpirun_version
from .report import collect, format_report, run_doctor

__all__ = ["run_doctor", "collect", "format_report", "parse_mpirun_version", "package_version",
           "cpu_facts", "memory_facts", "network_facts", "launcher_facts", "PROBE_TIMEOUT", "SETUP_FIX"]

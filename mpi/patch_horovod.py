"""Patch an unpacked Horovod 0.28.1 sdist so it builds against torch >= 2.1 and TF >= 2.16.

Known problems, each fixed by one edit below (see README "How Horovod is built"):
  1. torch >= 2.1 headers need C++17, but the torch target is compiled as C++14.
     Fix: build the torch target as C++17 and link it against the C++17 copy of Gloo
     (``compatible17_gloo``) that the sdist already makes for TF >= 2.10.
  2. CMake 4 refuses the bundled Gloo's ``cmake_minimum_required``: handled by the caller
     through ``CMAKE_POLICY_VERSION_MINIMUM=3.5`` in the build environment.
  3. TF 2.21's headers lack ``highwayhash/``, which only the optional XLA ops need:
     leave ``xla_mpi_ops.cc`` out of the TF target.
  4. A runtime bug: under Gloo the stall check never reports a stalled rank (its rank table is empty).
  5. A runtime cost: under the MPI controller one rank's background thread busy-waits a whole core on an idle
     or lightly loaded job (each rank times its cycle from its own loop start; see the edit below).

Every edit asserts that its anchor text exists, so a different sdist fails loudly instead of
building something half-patched. Running it twice is harmless (edits are marked).

Example::

    python mpi/patch_horovod.py /tmp/horovod-0.28.1
"""
import pathlib
import sys

MARK = "# hvdkit-patched"


def _edit(path, old, new, comment="#"):
    text = path.read_text()
    if MARK[1:] in text:
        return False
    if old not in text:
        sys.exit(f"patch_horovod: anchor not found in {path}: {old!r}; is this Horovod 0.28.1?")
    path.write_text(comment + MARK[1:] + "\n" + text.replace(old, new, 1))
    return True


def patch(src):
    src = pathlib.Path(src)
    # 1a. torch target: C++17 for torch >= 2.1 and tell the top level it needs the C++17 Gloo.
    _edit(
        src / "horovod/torch/CMakeLists.txt",
        'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()',
        'if(Pytorch_VERSION VERSION_GREATER_EQUAL "2.1")\n'
        '    set(CMAKE_CXX_STANDARD 17)\n'
        '    set(Pytorch_CXX17 TRUE)\n'
        'elseif(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n'
        '    set(CMAKE_CXX_STANDARD 14)\n'
        '    set(Pytorch_CXX17 FALSE)\n'
        'endif()\n'
        'set(Pytorch_CXX17 ${Pytorch_CXX17} PARENT_SCOPE)\n'
        'if(HAVE_GLOO AND Pytorch_CXX17)\n'
        '    list(REMOVE_ITEM PYTORCH_LINKER_LIBS gloo compatible_gloo)\n'
        # First in the link line: libtorch_cpu.so exports its own (different) Gloo, and a shared
        # library listed earlier would satisfy the symbols and leave them bound to torch's copy.
        '    list(INSERT PYTORCH_LINKER_LIBS 0 compatible17_gloo)\n'
        'endif()',
    )
    # 1b. top level: build compatible17_gloo for torch too; its ABI follows whichever framework needs it.
    _edit(
        src / "CMakeLists.txt",
        "if(HAVE_GLOO AND (DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17))",
        "if(HAVE_GLOO AND ((DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17) OR (DEFINED Pytorch_CXX17 AND Pytorch_CXX17)))",
    )
    top = src / "CMakeLists.txt"
    text = top.read_text()
    old_abi = "    if (Tensorflow_CXX11)\n        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)"
    new_abi = ("    if (Tensorflow_CXX11 OR (NOT DEFINED Tensorflow_CXX17 AND Pytorch_CXX11))\n"
               "        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)")
    if new_abi not in text:
        if old_abi not in text:
            sys.exit(f"patch_horovod: anchor not found in {top}: compatible17_gloo ABI block")
        top.write_text(text.replace(old_abi, new_abi, 1))
    # 4. Gloo controller: the global-rank table is reserve()d, not resize()d, then written through data(), so its
    #    size() stays 0 and the stall inspector (which walks it) never sees a missing rank: no stall warning or
    #    shutdown under horovodrun --gloo, the launcher elastic jobs need (the MPI controller fills it correctly).
    _edit(
        src / "horovod/common/gloo/gloo_controller.cc",
        "  global_ranks_.reserve(size_);",
        "  global_ranks_.resize(size_);",
        comment="//",
    )
    # 5. MPI controller: each cycle sleeps until `last_cycle_start + cycle time`, timed from that rank's own loop
    #    start. The rank that waited longest in the last negotiation starts its next loop late, sleeps ~0, reaches
    #    the next negotiation first and busy-waits inside MPI for the whole cycle, every cycle: 96-99% of a core on
    #    an idle 2-rank job (3-5% with this edit). Timing the next cycle from the end of the negotiation, a moment
    #    every rank shares, keeps the ranks in step. Gloo blocks instead of spinning, so it keeps its timing.
    _edit(
        src / "horovod/common/operations.cc",
        "    if (process_set_id == 0) {\n"
        "      state.mark_cycles_in_timeline =\n"
        "          state.timeline_controller.MarkCyclesInTimelinePending();\n"
        "    }\n",
        "    if (process_set_id == 0) {\n"
        "      state.mark_cycles_in_timeline =\n"
        "          state.timeline_controller.MarkCyclesInTimelinePending();\n"
        "    }\n"
        "    if (process_set_id == 0 && state.control_operation == LibType::MPI) {\n"
        "      state.last_cycle_start = std::chrono::steady_clock::now();\n"
        "    }\n",
        comment="//",
    )
    # 3. TF target: drop the optional XLA ops (need highwayhash headers that TF 2.21 does not ship).
    _edit(
        src / "horovod/tensorflow/CMakeLists.txt",
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")',
        "# xla_mpi_ops.cc left out: TF 2.21 headers lack highwayhash/ (hvdkit)",
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: patch_horovod.py HOROVOD_SOURCE_DIR")
    patch(sys.argv[1])
    print(f"patch_horovod: patched {sys.argv[1]}")

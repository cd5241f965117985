#!/usr/bin/env bash
# One idempotent setup for hvdkit: Debian's OpenMPI, a .venv with torch + TensorFlow + mpi4py,
# Horovod 0.28.1 built from its sdist (patched, wheel cached), and a final `horovodrun --check-build`.
# Every step skips itself when its result is already there; a second run takes seconds.
#
#   bash mpi/setup.sh            # set up (or check) everything
#   HVDKIT_CACHE=/path bash mpi/setup.sh   # keep built Horovod wheels elsewhere (default ~/.cache/hvdkit)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY_VERSION=3.11            # the torch 2.13.0 CPU wheel on this machine kind is cp311
TORCH_VERSION=2.13.0
TF_VERSION=2.21.0
HOROVOD_VERSION=0.28.1
CACHE="${HVDKIT_CACHE:-$HOME/.cache/hvdkit}"
BUILD_JOBS="${HVDKIT_BUILD_JOBS:-3}"   # TF translation units take ~1.5 GB each; 3 fit in any 8 GB machine

step() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[setup] ERROR: %b\n' "$*" >&2; exit 1; }
# Run a noisy command quietly; show its output only when it fails.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  ((rc == 0)) || grep -v 'WARNING: Location' "$log" >&2
  rm -f "$log"
  return "$rc"
}

main() {
  # ---- 1. system packages --------------------------------------------------------------------------
  missing=()
  command -v mpirun >/dev/null || missing+=(openmpi-bin)
  command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      die "missing ${missing[*]}; install them as root (apt-get install ${missing[*]}) or put OpenMPI 4.x, cmake and g++ on PATH, then re-run"
    fi
    step "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    step "system packages present (OpenMPI $(mpirun --version 2>/dev/null | head -n1 | awk '{print $NF}'), cmake, g++)"
  fi
  # Optional: sshd and iproute2 for the namespace hosts (mpi/netns_hosts.py, tests/test_multihost.py); without
  # them those tests skip. Installing openssh-server starts no daemon here: netns_hosts.py runs its own sshds.
  optional=()
  [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || optional+=(openssh-server)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || optional+=(iproute2)
  if ((${#optional[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      step "installing Debian packages for the multi-host tests: ${optional[*]}"
      export DEBIAN_FRONTEND=noninteractive
      quiet apt-get install -y -qq --no-install-recommends "${optional[@]}" \
        || { apt-get update -qq && quiet apt-get install -y -qq --no-install-recommends "${optional[@]}"; }
    else
      step "note: ${optional[*]} missing (needs root and apt-get); the multi-host tests will skip"
    fi
  fi

  # ---- 2. virtual environment ----------------------------------------------------------------------
  if [ ! -x "$VENV/bin/python" ]; then
    PY=$(command -v "python$PY_VERSION" || true)
    [ -n "$PY" ] || die "python$PY_VERSION not found; install Python $PY_VERSION (torch $TORCH_VERSION's CPU wheel is cp311)"
    step "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

  # ---- 3. Python packages (keyed by the files that decide them) -------------------------------------
  deps_key=$(cat "$ROOT/setup.cfg" "$ROOT/mpi/setup.sh" | sha256sum | cut -c1-16)
  if [ "$(cat "$VENV/.hvdkit-deps" 2>/dev/null)" != "$deps_key" ]; then
    step "installing torch $TORCH_VERSION (CPU), tensorflow-cpu $TF_VERSION, mpi4py and hvdkit (editable) — a few minutes the first time"
    quiet "${PIP[@]}" install --upgrade pip setuptools wheel
    quiet "${PIP[@]}" install "torch==$TORCH_VERSION" "tensorflow-cpu==$TF_VERSION" mpi4py
    quiet "${PIP[@]}" install -e "$ROOT[torch,tensorflow,test,bench]"
    # tf_keras only for the MultiWorkerMirroredStrategy baseline of `hvdkit bench`; --no-deps because it
    # requires the `tensorflow` distribution, which would overwrite tensorflow-cpu's files.
    quiet "${PIP[@]}" install --no-deps "tf_keras==${TF_VERSION%.*}.*"
    echo "$deps_key" >"$VENV/.hvdkit-deps"
  else
    step "Python packages up to date"
  fi

  # ---- 4. Horovod, built from the sdist with the known fixes; the wheel cached by what it was built against
  ver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  patch_key=$(cat "$ROOT/mpi/patch_horovod.py" | sha256sum | cut -c1-12)
  hvd_key="horovod-$HOROVOD_VERSION-torch$(ver torch)-tf$(ver tensorflow-cpu)-$(basename "$(readlink -f "$(command -v mpicc)")")-py$PY_VERSION-$patch_key"
  wheel_dir="$CACHE/wheels/$hvd_key"
  if [ "$(cat "$VENV/.hvdkit-horovod" 2>/dev/null)" = "$hvd_key" ] && "$VENV/bin/python" -c "import horovod" 2>/dev/null; then
    step "Horovod $HOROVOD_VERSION already installed ($hvd_key)"
  else
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
      build=$(mktemp -d)
      trap 'rm -rf "$build"' EXIT
      step "building Horovod $HOROVOD_VERSION from source (MPI + Gloo, PyTorch + TensorFlow) — about 5 minutes on 2 cores"
      quiet "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
      tar xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
      "$VENV/bin/python" "$ROOT/mpi/patch_horovod.py" "$build/horovod-$HOROVOD_VERSION"
      mkdir -p "$wheel_dir"
      log="$CACHE/build-$hvd_key.log"
      step "compiling; full log in $log"
      # Progress: print CMake's [ nn%] lines as they come; the whole log is kept for errors.
      if ! env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
          HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI CMAKE_POLICY_VERSION_MINIMUM=3.5 \
          MAKEFLAGS="-j$BUILD_JOBS" PATH="$VENV/bin:$PATH" \
          "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$wheel_dir" "$build/horovod-$HOROVOD_VERSION" \
          2>&1 | tee "$log" | grep --line-buffered -oE '\[ *[0-9]+%\] (Building|Linking) [^ ]+ [^ ]+ [^ ]+' | sed -u 's/^/    /'; then
        :
      fi
      ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1 || { tail -n 40 "$log" >&2; rm -rf "$wheel_dir"; die "Horovod build failed; see $log"; }
    else
      step "reusing cached Horovod wheel $wheel_dir"
    fi
    quiet "${PIP[@]}" uninstall -y horovod || true
    quiet "${PIP[@]}" install "$(ls "$wheel_dir"/horovod-*.whl | head -n1)"
    echo "$hvd_key" >"$VENV/.hvdkit-horovod"
  fi

  # ---- 5. the build must have everything -----------------------------------------------------------
  report=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $report"
  for want in "TensorFlow" "PyTorch" "MPI" "Gloo"; do
    grep -q "\[X\] $want" <<<"$report" || die "Horovod was built without $want:\n$report"
  done
  [ "$(grep -c '\[X\] MPI' <<<"$report")" -ge 2 ] && [ "$(grep -c '\[X\] Gloo' <<<"$report")" -ge 2 ] \
    || die "Horovod lacks MPI or Gloo controllers/tensor operations:\n$report"
  step "Horovod check-build: [X] TensorFlow [X] PyTorch [X] MPI [X] Gloo (controllers and tensor operations)"
  step "ready: $VENV"
}

main "$@"

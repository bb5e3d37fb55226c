#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine: installs what is missing, builds, runs.
#   tools/dev.sh bench [bench args]   the benchmark (python -m pyublk_fast.bench)
#   tools/dev.sh test  [pytest args]  host tests, then the real-kernel tests in a qemu VM
#   tools/dev.sh build                install and build only
#   tools/dev.sh docs                 the API reference (Sphinx) into build/docs/
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential pkg-config liburing-dev fio qemu-utils e2fsprogs busybox-static nbdkit
              ceph-mon ceph-osd librbd-dev librados-dev)
PIP_PACKAGES=(wheel "setuptools>=64" "cython>=3.0" "numpy>=1.24" "pytest>=7" "hypothesis>=6" "matplotlib>=3.6" "rich>=13" "prometheus_client>=0.16"
              "build>=1" "sphinx>=7" "mypy>=1.8" "zstandard>=0.19")
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    "$PY" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" 2>&1 | grep -v "Running pip as the 'root'" || true
    # extensions are built in place and the package installed editable (backends/ -> pyublk_fast.backends)
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 \
        | grep -v "Running pip as the 'root'" || true
    "$PY" setup.py -q build_ext --inplace >/dev/null
}

run_pytest() {
    set +e
    "$PY" -m pytest "$@"
    local rc=$?
    set -e
    if [ $rc -eq 5 ]; then
        echo "dev.sh: pytest collected no tests for: $* -- that is a failure here" >&2
        return 1
    fi
    return $rc
}

case "${1:-}" in
    build) install ;;
    bench) shift; install; exec "$PY" -m pyublk_fast.bench "$@" ;;
    docs)
        install
        "$PY" -m sphinx -W --keep-going -q -b html docs/api build/docs
        echo "dev.sh: the API reference is in build/docs/index.html"
        ;;
    test)
        shift; install
        run_pytest -q "$@" tests --ignore=tests/kernel
        if [ -x tools/vm/run-kernel-tests ]; then
            tools/vm/run-kernel-tests
        else
            echo "dev.sh: tools/vm/run-kernel-tests missing: real-kernel lane not run" >&2
            exit 1
        fi
        ;;
    *) echo "usage: tools/dev.sh build|bench|test|docs [args]" >&2; exit 2 ;;
esac

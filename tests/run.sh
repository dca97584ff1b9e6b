#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: installs what the tests need
# (a Python virtual environment in .venv for the servers later stages test
# against, from tests/requirements.txt; podman for the worker image), checks
# the formatting, builds the binary the CLI tests call, runs every Rust
# test, and runs clippy with warnings as errors. The tests start and stop their own servers.
#
# Needs ../shared beside the repository (the public FHIR data sets).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/data ]; then
    echo "tests/run.sh: ../shared is missing beside the repository" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
# podman builds the worker image (tests/deploy/container.sh), from Debian's packages.
if ! command -v podman >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get install -y -q podman >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q podman >/dev/null; }
fi

cargo fmt --all --check

cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# Lints after the tests, so that a lint does not hide a test result.
lint=0
cargo clippy --workspace --all-targets -- -D warnings || lint=$?
# One closing line with the totals of every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
if [ "$lint" -ne 0 ]; then
    echo "clippy: warnings (see above)"
fi
[ "$status" -eq 0 ] && [ "$lint" -eq 0 ]

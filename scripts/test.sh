#!/usr/bin/env bash
# Runs every gate and test, from a fresh virtualenv in .venv: formatting and lints (cargo fmt --check,
# clippy with warnings as errors, ruff), the stub check of _core.pyi, then the Rust core's tests (cargo
# test, which includes the bounded fuzzing of tests/fuzz_parsers.rs) and the Python package's (pytest).
# Needs only python3 and a Rust toolchain (with rustfmt and clippy); everything else comes from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet '.[test]'
.venv/bin/python -m ruff check python tests scripts bench
.venv/bin/python -m mypy.stubtest ferrovlm._core  # python/ferrovlm/_core.pyi against the built native module
cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 || rustup component add rustfmt clippy
cargo fmt --check
PYO3_PYTHON="$PWD/.venv/bin/python" cargo clippy --quiet --all-targets --features python -- -D warnings
cargo test --quiet
.venv/bin/python -m pytest -q tests

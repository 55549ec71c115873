#!/usr/bin/env bash
# Runs every test: the Rust core's (cargo test) and the Python package's (pytest), from a fresh
# virtualenv in .venv. Needs only python3 and a Rust toolchain; everything else comes from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet '.[test]'
.venv/bin/python -m ruff check python tests scripts bench
.venv/bin/python -m mypy.stubtest ferrovlm._core  # python/ferrovlm/_core.pyi against the built native module
cargo test --quiet
.venv/bin/python -m pytest -q tests

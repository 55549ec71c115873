"""Importing ferrovlm keeps candle's own elementwise thread pool to one thread (it would otherwise spin
against rayon's pool for the same cores), unless the user chose a value."""

import os
import subprocess
import sys

SNIPPET = "import os, ferrovlm; print(os.environ['CANDLE_NUM_THREADS'])"


def run(env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "CANDLE_NUM_THREADS"}
    if env_value is not None:
        env["CANDLE_NUM_THREADS"] = env_value
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_one_candle_thread_by_default():
    assert run() == "1"


def test_a_user_setting_is_kept():
    assert run("3") == "3"

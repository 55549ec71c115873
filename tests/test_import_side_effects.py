"""Process-wide side effects of ferrovlm: importing it keeps candle's own elementwise thread pool to one
thread (it would otherwise spin against rayon's pool for the same cores) unless the user chose a value,
and neither the import nor set_seed (called by the trainers) imports torch (about 500 MB)."""

import os
import subprocess
import sys

SNIPPET = "import os, ferrovlm; print(os.environ['CANDLE_NUM_THREADS'])"


def run(env_value=None, snippet=SNIPPET, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "CANDLE_NUM_THREADS"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path)] + [p for p in [env.get("PYTHONPATH")] if p])
    if env_value is not None:
        env["CANDLE_NUM_THREADS"] = env_value
    out = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_one_candle_thread_by_default():
    assert run() == "1"


def test_a_user_setting_is_kept():
    assert run("3") == "3"


def test_set_seed_does_not_import_torch(tmp_path):
    # A stand-in torch module first on the path: importing it at all would show in sys.modules.
    (tmp_path / "torch.py").write_text("def manual_seed(seed):\n    pass\n")
    snippet = "import sys, ferrovlm; ferrovlm.set_seed(3); print('torch' in sys.modules)"
    assert run(snippet=snippet, extra_path=tmp_path) == "False"
    # ... while a program that imported torch gets it seeded.
    snippet = (
        "import sys, torch; seen = []; torch.manual_seed = seen.append; import ferrovlm; ferrovlm.set_seed(3); "
        "print(seen)"
    )
    assert run(snippet=snippet, extra_path=tmp_path) == "[3]"

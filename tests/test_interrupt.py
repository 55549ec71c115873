"""Long Rust calls release the GIL and stop on Ctrl-C with KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from ferrovlm import AutoModelForVision2Seq  # noqa: E402
from tiny_checkpoint import write_checkpoint  # noqa: E402

# Big enough that one forward takes a good fraction of a second on 2 cores.
SLOW = {
    "model_type": "idefics3", "image_token_id": 250, "scale_factor": 4, "tie_word_embeddings": True,
    "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 12,
                      "num_attention_heads": 4, "image_size": 512, "patch_size": 16},
    "text_config": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "rms_norm_eps": 1e-5},
}


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    d = write_checkpoint(tmp_path_factory.mktemp("slow") / "ckpt", SLOW, seed=1)
    return AutoModelForVision2Seq.from_pretrained(d, dtype="float32")


def _inputs(n_images: int):
    ids = np.array([[5] + [250] * (64 * n_images) + [6]], dtype=np.int64)
    px = np.random.default_rng(0).uniform(-1, 1, (1, n_images, 3, 512, 512)).astype(np.float32)
    return {"input_ids": ids, "pixel_values": px}


def test_forward_releases_the_gil(slow_model):
    inputs = _inputs(2)
    done = threading.Event()
    ticks = 0

    def run():
        slow_model(**inputs)
        done.set()

    t = threading.Thread(target=run)
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    assert elapsed > 0.05
    # with the GIL held by the forward, this loop could not run at all
    assert ticks > 0.2 * elapsed / 0.0011


def test_ctrl_c_interrupts_a_long_forward(slow_model):
    inputs = _inputs(4)
    t0 = time.perf_counter()
    slow_model(**_inputs(1))
    one_image = time.perf_counter() - t0
    # Ctrl-C from 50 ms on, repeated every 20 ms until the call has returned (one signal can land in a
    # window where no check runs when the machine is loaded; a user would press again too).
    done = threading.Event()

    def press():
        time.sleep(0.05)
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            done.wait(0.02)

    armed = [True]

    def on_sigint(signum, frame):  # Python's default for the first signal; later ones are dropped (one
        if armed[0]:  # still pending when the first unwinds would otherwise escape pytest.raises)
            armed[0] = False
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    t0 = time.perf_counter()
    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            slow_model(**inputs)
    finally:
        armed[0] = False
        done.set()
        presser.join()
        time.sleep(0.05)  # let a last signal in flight be handled (and dropped)
        signal.signal(signal.SIGINT, previous)
    # stopped well before the 4-image forward (~4x one image) would have finished
    assert time.perf_counter() - t0 < 2.5 * one_image + 0.2

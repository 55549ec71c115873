"""End to end on a complete tiny checkpoint: processor -> generate -> decode, the pipeline, and the
streamers (their text equals decoding the result)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ferrovlm import AutoModelForVision2Seq, AutoProcessor, TextIteratorStreamer, TextStreamer, pipeline

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def parts(tiny_smolvlm):
    return AutoModelForVision2Seq.from_pretrained(tiny_smolvlm), AutoProcessor.from_pretrained(tiny_smolvlm)


def image():
    y, x = np.mgrid[0:40, 0:56]
    return PIL.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))


def messages():
    return [
        {"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What is this?"}]}
    ]


def new_text(model, processor, **gen):
    inputs = processor.apply_chat_template(
        messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    out = model.generate(**inputs, **gen)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0], inputs, out


def test_pipeline_returns_generated_text(parts, tiny_smolvlm):
    model, processor = parts
    want, _, _ = new_text(model, processor, max_new_tokens=6)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    res = pipe(text=messages(), max_new_tokens=6, return_full_text=False)
    assert res == [{"input_text": messages(), "generated_text": want}] or res[0]["generated_text"] == want
    full = pipe(text=messages(), max_new_tokens=6)
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": want}
    by_path = pipeline("image-text-to-text", model=str(tiny_smolvlm))
    assert by_path(text=messages(), max_new_tokens=6, return_full_text=False)[0]["generated_text"] == want


def test_text_streamer_prints_the_decoded_answer(parts, capsys):
    model, processor = parts
    want, inputs, _ = new_text(model, processor, max_new_tokens=8)
    model.generate(
        **inputs,
        max_new_tokens=8,
        streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == want


def test_iterator_streamer_yields_while_generating(parts):
    model, processor = parts
    want, inputs, _ = new_text(model, processor, max_new_tokens=8)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    t = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=8, streamer=streamer))
    t.start()
    chunks = list(streamer)
    t.join()
    assert "".join(chunks) == want


def test_streamer_refuses_batches(parts):
    model, processor = parts
    inputs = processor(text=["a", "b c"], padding=True, return_tensors="np")
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(**inputs, max_new_tokens=2, streamer=TextStreamer(processor.tokenizer))

"""AutoProcessor reproduces transformers' Idefics3Processor (PIL image processor) exactly: token ids,
masks and bit-identical pixel values (reference: scripts/reference/processor.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import FIXTURES
from ferrovlm import AutoProcessor, ProcessorError

PIL = pytest.importorskip("PIL.Image")

EXPECTED = dict(np.load(FIXTURES / "processor" / "expected.npz"))
META = json.loads((FIXTURES / "processor" / "calls.json").read_text())
IMAGES = FIXTURES / "processor_images" / "images"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The SmolVLM tokenizer files plus the processor configs, in one folder like a hub checkpoint."""
    dst = tmp_path_factory.mktemp("proc") / "checkpoint"
    shutil.copytree(FIXTURES / "tokenizer" / "smolvlm", dst)
    for f in (FIXTURES / "processor" / "config").iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def processor(checkpoint):
    return AutoProcessor.from_pretrained(checkpoint)


def load(name):
    img = PIL.open(IMAGES / name)
    img.load()
    return img


def user(*content):
    return [{"role": "user", "content": list(content)}]


def test_chat_template_strings(processor):
    T = lambda s: {"type": "text", "text": s}  # noqa: E731
    img = {"type": "image"}
    assert (
        processor.apply_chat_template(user(img, T("Can you describe this image?")), add_generation_prompt=True)
        == META["prompts"]["describe"]
    )
    assert (
        processor.apply_chat_template(user(T("Compare"), img, T("and"), img), add_generation_prompt=True)
        == META["prompts"]["compare"]
    )
    assert (
        processor.apply_chat_template(user(T("Tell me a joke.")), add_generation_prompt=True)
        == META["prompts"]["text_only"]
    )


@pytest.mark.parametrize("name", sorted(META["calls"]))
def test_processor_call_matches_transformers(processor, name):
    call = dict(META["calls"][name])
    images = call.pop("images")
    if images is not None:
        images = (
            [[load(n) for n in s] for s in images]
            if images and isinstance(images[0], list)
            else [load(n) for n in images]
        )
    out = processor(images=images, **call, return_tensors="np")
    keys = sorted(k[len(name) + 1:] for k in EXPECTED if k.startswith(name + "."))
    assert sorted(out.keys()) == keys
    for k in keys:
        want = EXPECTED[f"{name}.{k}"]
        got = np.asarray(out[k])
        assert got.shape == want.shape, k
        if k == "pixel_values":
            assert got.dtype == np.float32
            assert np.abs(got - want).max() == 0.0  # bit-identical
        else:
            np.testing.assert_array_equal(got, want.astype(got.dtype))


def test_positional_text_then_images_and_attribute_access(processor):
    call = META["calls"]["single"]
    out = processor(call["text"], [load("rgb_100x70.png")], return_tensors="np")
    np.testing.assert_array_equal(out.input_ids, EXPECTED["single.input_ids"])


def test_image_processor_settings_are_assignable(processor):
    ip = processor.image_processor
    before = ip.do_image_splitting
    ip.do_image_splitting = False
    try:
        out = processor(text=META["calls"]["no_split"]["text"], images=[load("rgb_37x53.png")], return_tensors="np")
        assert np.abs(out.pixel_values - EXPECTED["no_split.pixel_values"]).max() == 0.0
    finally:
        ip.do_image_splitting = before
    assert ip.size == {"longest_edge": 96} and ip.max_image_size == {"longest_edge": 32}


def test_numpy_images_equal_pil_rgb(processor):
    img = load("rgb_100x70.png")
    a = processor(text="<image>", images=[img], return_tensors="np")
    b = processor(text="<image>", images=[np.asarray(img)], return_tensors="np")
    assert np.array_equal(a.pixel_values, b.pixel_values) and np.array_equal(a.input_ids, b.input_ids)


def test_batch_decode_and_tokenizer_surface(processor):
    tok = processor.tokenizer
    ids = tok("User: hello")["input_ids"]
    assert processor.decode(ids) == "User: hello"
    assert processor.batch_decode([ids, ids], skip_special_tokens=True) == ["User: hello"] * 2
    assert tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert "<end_of_utterance>" in tok.additional_special_tokens
    tok.padding_side = "left"
    assert tok.padding_side == "left"
    tok.padding_side = "right"


@pytest.mark.parametrize("images,pattern", [
    ([], r"sample 0.*\[1\].*\[0\]"),
    ([[], []], "2 image"),
])
def test_image_count_mismatch_names_the_sample(processor, images, pattern):
    text = ["<image> one"] if len(images) < 2 else ["no image", "<image> two"]
    imgs = images if images else None
    if imgs is None:
        with pytest.raises(ProcessorError, match="sample 0"):
            processor(text=text, images=[[]])
        return
    with pytest.raises(ProcessorError, match="sample 1"):
        processor(text=text, images=imgs)


def test_too_many_images(processor):
    with pytest.raises(ProcessorError, match="sample 0"):
        processor(text=["<image>"], images=[[load("rgb_1x1.png"), load("rgb_1x1.png")]])


def test_corrupt_image_bytes(processor, tmp_path):
    from ferrovlm import load_image

    bad = tmp_path / "bad.png"
    bad.write_bytes((IMAGES / "rgb_37x53.png").read_bytes()[:40])
    with pytest.raises(ProcessorError, match="bad.png|decode"):
        processor(text="<image>", images=[str(bad)])
    with pytest.raises(ProcessorError):
        load_image(b"not an image at all")


def test_zero_sized_and_oversized_images(processor, monkeypatch):
    import ferrovlm.image_processing as ipm

    with pytest.raises(ProcessorError, match="sample 0, image 0"):
        processor(text="<image>", images=[np.zeros((0, 5, 3), np.uint8)])
    monkeypatch.setattr(ipm, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ProcessorError, match="exceeds the limit"):
        processor(text="<image>", images=[load("rgb_37x53.png")])


def test_unknown_content_type_and_raising_template(processor):
    with pytest.raises(ProcessorError):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "hologram"}]}],
            chat_template=(
                "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] not in ['text', 'image'] %}"
                "{{ raise_exception('unknown content type ' + c['type']) }}{% endif %}{% endfor %}{% endfor %}"
            ),
        )
    with pytest.raises(ProcessorError, match="nope"):
        processor.apply_chat_template(
            user({"type": "text", "text": "x"}), chat_template="{{ raise_exception('nope') }}"
        )


def test_apply_chat_template_tokenize_runs_the_processor(processor):
    conv = user(
        {"type": "image", "image": load("rgb_100x70.png")}, {"type": "text", "text": "Can you describe this image?"}
    )
    out = processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    np.testing.assert_array_equal(out["input_ids"], EXPECTED["single.input_ids"])
    assert np.abs(out["pixel_values"] - EXPECTED["single.pixel_values"]).max() == 0.0


SIZE_TUPLE = dict(np.load(FIXTURES / "processor_size_tuple" / "expected.npz"))
SIZE_TUPLE_META = json.loads((FIXTURES / "processor_size_tuple" / "calls.json").read_text())["calls"]


@pytest.mark.parametrize("name", sorted(SIZE_TUPLE_META))
def test_non_dict_size_as_the_smol_course_video_cell_sets_it(checkpoint, name):
    """smol-course's video cell: `processor.image_processor.size = (384, 384)` (a tuple) and
    `do_resize = False`, then a processor call on the frames; plus a (height, width) tuple and an int
    with do_resize on. Same outputs as transformers (scripts/reference/processor_size_tuple.py)."""
    call = SIZE_TUPLE_META[name]
    processor = AutoProcessor.from_pretrained(checkpoint)
    for k, v in call["attrs"].items():
        setattr(processor.image_processor, k, tuple(v) if k == "size" and call["size_is_tuple"] else v)
    frames = [load(n) for n in call["images"]]
    content = [{"type": "text", "text": "Describe the video."}] + [{"type": "image"} for _ in frames]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt == call["prompt"]
    out = processor(text=prompt, images=frames, return_tensors="np")
    keys = sorted(k[len(name) + 1:] for k in SIZE_TUPLE if k.startswith(name + "."))
    assert sorted(out.keys()) == keys
    for k in keys:
        want, got = SIZE_TUPLE[f"{name}.{k}"], np.asarray(out[k])
        assert got.shape == want.shape, k
        if k == "pixel_values":
            assert got.dtype == np.float32 and np.abs(got - want).max() == 0.0  # bit-identical
        else:
            np.testing.assert_array_equal(got, want.astype(got.dtype))


def test_sizes_transformers_rejects_still_raise(checkpoint):
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor.do_resize = False
    for bad in [(384,), {"foo": 3}, "384"]:
        processor.image_processor.size = bad
        with pytest.raises(ProcessorError, match="size"):
            processor(text="<image>", images=[load("rgb_37x53.png")])

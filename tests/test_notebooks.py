"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh ipykernel per notebook, a failing cell fails
the test), on the model that the README demo builds from the real SmolLM2-135M-Instruct, built here once at a
small size. The committed notebooks are stripped of outputs and are what scripts/make_notebooks.py writes.

Needs the real weights (SMOLLM2_GGUF, set by scripts/test.sh) for the runs. FERROVLM_NOTEBOOK_MODEL=<folder> reuses
a model folder that the demo wrote, and FERROVLM_NOTEBOOK_SAVE_DIR=<folder> keeps the executed notebooks (dev only).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["vlm_usage.ipynb", "vlm_sft.ipynb", "vlm_dpo.ipynb", "vlm_from_parts.ipynb"]

needs_gguf = pytest.mark.skipif(not os.environ.get("SMOLLM2_GGUF"), reason="SMOLLM2_GGUF is not set")


def test_the_four_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS) == sorted(NAMES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: cell {i} has outputs (strip them)"
            assert cell["execution_count"] is None, f"{path.name}: cell {i} has an execution count"
    assert "widgets" not in nb["metadata"]


def test_notebooks_are_the_generators_cells():
    pytest.importorskip("nbformat")
    import make_notebooks

    assert make_notebooks.main(["--check"]) == 0, "notebooks/ differs from scripts/make_notebooks.py"


@pytest.fixture(scope="session")
def demo_model(request) -> Path:
    """The README demo's model at a small size (conftest's small_demo, shared with tests/test_demo.py)."""
    reuse = os.environ.get("FERROVLM_NOTEBOOK_MODEL")
    if reuse:
        return Path(reuse)
    return request.getfixturevalue("small_demo")["out"] / "model"


@needs_gguf
def test_demo_model_loads_as_a_hub_folder(demo_model):
    """What the notebooks need of the demo's model/ folder: transformers' Auto classes load it (the processor
    files included), and generation stops at SmolVLM's <end_of_utterance>."""
    from ferrovlm import AutoModelForVision2Seq, AutoProcessor

    model = AutoModelForVision2Seq.from_pretrained(demo_model)
    processor = AutoProcessor.from_pretrained(demo_model)
    assert processor.image_processor.size == {"longest_edge": 64}
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")


def _kernel_manager(tmp_path: Path):
    """A kernel that runs this interpreter (the .venv's python in CI), whatever kernels Jupyter knows of."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "ferrovlm-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ferrovlm tests", "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="ferrovlm-test", kernel_spec_manager=ksm)


@needs_gguf
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, demo_model, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    import ferrovlm

    # the kernel inherits this environment: the model folder, the short training runs, Jupyter's plotting
    # backend (whatever MPLBACKEND says outside), and the ferrovlm these tests import (a source tree too)
    monkeypatch.setenv("FERROVLM_NOTEBOOK_MODEL", str(demo_model))
    monkeypatch.setenv("FERROVLM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    package_root = str(Path(ferrovlm.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    work = tmp_path / "work"  # the notebooks write their outputs (adapters, pictures) next to themselves
    work.mkdir()
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=900, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    finally:
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
        if os.environ.get("FERROVLM_NOTEBOOK_SAVE_DIR"):  # dev only: the executed notebooks, outputs and all
            nbformat.write(nb, Path(os.environ["FERROVLM_NOTEBOOK_SAVE_DIR"]) / name)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name in ("vlm_sft.ipynb", "vlm_dpo.ipynb", "vlm_from_parts.ipynb"):
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} drew no plot"
    if name == "vlm_sft.ipynb":
        assert (work / "smolvlm-instruct-trl-sft-ChartQA" / "adapter_model.safetensors").is_file()
        assert "before training:" in text
    if name == "vlm_from_parts.ipynb":
        assert (work / "smolvlm-parts" / "model" / "model.safetensors").is_file()

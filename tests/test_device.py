"""Devices as transformers names them: device_map= of from_pretrained, model.to(...), model.device; what a
build without CUDA (or a machine without a GPU) answers."""

from __future__ import annotations

import pytest

import ferrovlm
from ferrovlm import DeviceError, _core
from ferrovlm.device import device, device_spec, is_device_arg


def test_device_object_is_like_torch():
    d = device("cuda:1")
    assert (d.type, d.index, str(d), repr(d)) == ("cuda", 1, "cuda:1", "device(type='cuda', index=1)")
    assert device("cuda").index is None and str(device("cuda")) == "cuda"
    assert device("cuda", 0) == "cuda:0" and device("cpu") == device("CPU") and device("cpu") != "cuda:0"
    assert (device("cpu").type, device("cpu").index, str(device("cpu"))) == ("cpu", None, "cpu")
    for bad in ("gpu", "cuda:x", "cuda:0:1"):
        with pytest.raises(ValueError):
            device(bad)
    with pytest.raises(ValueError):
        device("cuda:0", 1)


def test_device_map_forms():
    assert device_spec(None) is None
    assert device_spec("cpu") == "cpu" and device_spec("cuda:1") == "cuda:1" and device_spec(2) == "cuda:2"
    assert device_spec("auto") == device_spec("balanced") == device_spec("sequential") == "auto"
    assert device_spec({"": "cuda:0"}) == "cuda:0" and device_spec({"a": 0, "b": "cuda:0"}) == "cuda:0"
    assert device_spec(device("cuda:0")) == "cuda:0"
    with pytest.raises(ValueError, match="several devices"):
        device_spec({"model.vision": "cpu", "lm_head": 0})
    with pytest.raises(ValueError, match="offload"):
        device_spec("disk")
    assert is_device_arg("cuda") and is_device_arg(0) and not is_device_arg("float32") and not is_device_arg(True)


def test_core_resolves_names():
    assert _core.resolve_device("cpu") == "cpu"
    assert _core.resolve_device("auto") == ("cuda:0" if _core.cuda_available() else "cpu")
    with pytest.raises(DeviceError, match="not supported"):
        _core.resolve_device("mps")
    with pytest.raises(DeviceError, match="ordinal"):
        _core.resolve_device("cuda:one")


def test_cpu_model_device_and_to(tiny_smolvlm):
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map={"": "cpu"})
    assert (model.device.type, model.device.index, str(model.device)) == ("cpu", None, "cpu")
    assert model.to("cpu") is model and model.to(device="cpu") is model and str(model.device) == "cpu"
    auto = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map="auto")
    assert str(auto.device) == ("cuda:0" if _core.cuda_available() else "cpu")


@pytest.mark.skipif(_core.cuda_built(), reason="this build has CUDA")
def test_a_cpu_build_says_how_to_get_cuda(tiny_smolvlm):
    assert not _core.cuda_built() and not _core.cuda_available()
    for dm in ("cuda", "cuda:0", 0, {"": 0}):
        with pytest.raises(DeviceError, match=r"built without CUDA.*--features python,cuda"):
            ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map=dm)
    with pytest.raises(ferrovlm.FerroVLMError):  # DeviceError is one
        ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map="cuda")


@pytest.mark.skipif(not _core.cuda_built() or _core.cuda_available(), reason="needs a CUDA build, no GPU")
def test_a_cuda_build_without_a_gpu_names_what_is_missing(tiny_smolvlm):
    with pytest.raises(DeviceError, match=r"cuda:0: this machine lacks .*driver"):
        ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, device_map="cuda")
    model = ferrovlm.AutoModelForImageTextToText.from_pretrained(tiny_smolvlm)  # the CPU still works
    with pytest.raises(DeviceError, match="lacks"):
        model.to("cuda")
    assert str(model.device) == "cpu"

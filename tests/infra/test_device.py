"""Device and dtype selection: clear errors for what is not there, `auto` from measurements."""

from __future__ import annotations

import pytest
import torch

from lamina.errors import DeviceError, InvalidRequestError
from lamina.infra import device as dev


def test_cpu_and_auto_resolve() -> None:
    assert dev.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert dev.resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match=r"CUDA is not available.*--device cpu"):
        dev.resolve_device("cuda")


def test_unknown_device_and_dtype_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="use auto, cpu, cuda"):
        dev.resolve_device("tpu")
    with pytest.raises(InvalidRequestError, match="use auto, float32, bfloat16 or float16"):
        dev.resolve_dtype("float8", torch.device("cpu"))


def test_dtype_names_and_aliases() -> None:
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("float32", cpu) is torch.float32
    assert dev.resolve_dtype("bf16", cpu) is torch.bfloat16
    assert dev.resolve_dtype("fp16", cpu) is torch.float16


@pytest.mark.parametrize(
    ("gflops", "choice"),
    [
        ({"float32": 110.0, "bfloat16": 1.0, "float16": 0.5}, "float32"),  # AVX2 without bf16 units
        ({"float32": 216.0, "bfloat16": 660.0, "float16": 3.0}, "bfloat16"),  # AVX-512 BF16: fp16 GEMM pathological
        ({"float32": 100.0, "bfloat16": 120.0, "float16": 130.0}, "float32"),  # a marginal gain keeps fp32
        ({"float32": 50.0, "bfloat16": 400.0, "float16": 800.0}, "float16"),
    ],
)
def test_auto_dtype_follows_the_measurement(monkeypatch, tmp_path, gflops, choice) -> None:
    monkeypatch.setattr(dev, "_gemm_gflops", lambda device, dtype: gflops[str(dtype).removeprefix("torch.")])
    probe = dev.probe_dtypes(torch.device("cpu"), tmp_path)
    assert probe.choice == choice
    assert dev.resolve_dtype("auto", torch.device("cpu"), tmp_path) == dev.DTYPES[choice]


def test_probe_is_measured_once_and_cached(monkeypatch, tmp_path) -> None:
    calls = []

    def fake(device, dtype):
        calls.append(dtype)
        return 100.0

    monkeypatch.setattr(dev, "_gemm_gflops", fake)
    first = dev.probe_dtypes(torch.device("cpu"), tmp_path)
    n = len(calls)
    assert dev.probe_dtypes(torch.device("cpu"), tmp_path) == first
    assert len(calls) == n == 3
    assert (tmp_path / "probes.json").exists()


def test_real_probe_measures_something(tmp_path) -> None:
    probe = dev.probe_dtypes(torch.device("cpu"), tmp_path)
    assert probe.gflops["float32"] > 0 and probe.choice in dev.DTYPES


@pytest.mark.parametrize("layout", ["row_major", "input_major"])
def test_layout_optimisation_keeps_values(monkeypatch, layout) -> None:
    monkeypatch.setattr(dev, "probe_linear_layout", lambda device, dtype, cache_dir=None: layout)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    dev.optimize_for_inference(model, torch.device("cpu"))
    torch.testing.assert_close(model(x), before)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert model[0].weight.is_contiguous() == (layout == "row_major")


def test_threads_validation() -> None:
    assert dev.set_threads(None) == torch.get_num_threads()
    with pytest.raises(InvalidRequestError):
        dev.set_threads(0)


def test_devices_are_listed() -> None:
    devices = dev.list_devices()
    assert devices[0].name == "cpu" and devices[0].memory_bytes and devices[0].memory_bytes > 0

"""Devices and precision for every layer: which device to run on, which dtype is fast there.

`auto` never guesses a dtype from the device name: half-precision matmuls are 100x slower than fp32 on
some CPUs (AVX2 without bf16 units) and 4x faster on others (AVX-512 BF16, AMX), and fp16 GEMM can be
pathological where bf16 is fast. So the first time a device is asked for `auto`, Lamina times a small GEMM
in each candidate dtype and keeps the answer in `LAMINA_HOME/cache/dtype-probe.json`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lamina.errors import DeviceError, InvalidRequestError
from lamina.infra.fs import atomic_write_text

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# A half-precision dtype must beat fp32 by this much to be chosen by `auto`: fp32 is the more accurate
# choice, so a marginal speed-up does not justify it.
_HALF_MIN_SPEEDUP = 1.5


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto|cpu|cuda|cuda:N|mps` -> a device that exists, or a DeviceError saying what to use instead."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InvalidRequestError(
            f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps", param="device"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {spec!r} requested but MPS is not available; use --device cpu or auto")
    elif device.type != "cpu":
        raise InvalidRequestError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps", param="device")
    return device


def resolve_dtype(spec: str, device: torch.device, cache_dir: Path | None = None) -> torch.dtype:
    """`auto|float32|bfloat16|float16` -> a torch dtype; `auto` is the fastest measured on `device`."""
    name = _DTYPE_ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if name == "auto":
        return DTYPES[probe_dtypes(device, cache_dir).choice]
    if name not in DTYPES:
        raise InvalidRequestError(
            f"unknown dtype {spec!r}; use auto, float32, bfloat16 or float16", param="dtype"
        )
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{device} does not support bfloat16; use --dtype float16 or float32")
    return dtype


@dataclass(frozen=True)
class DtypeProbe:
    """GEMM throughput per dtype on one device, and the dtype `auto` picks from it."""

    device: str
    gflops: dict[str, float]
    choice: str

    def slower_than_float32(self, dtype: torch.dtype) -> bool:
        """Whether PyTorch's GEMM in `dtype` measured slower here than in float32."""
        return self.gflops.get(str(dtype).removeprefix("torch."), 0.0) < self.gflops["float32"]


def probe_dtypes(device: torch.device, cache_dir: Path | None = None) -> DtypeProbe:
    """Time a square GEMM in each dtype on `device` (cached per device, CPU flags and torch version)."""

    def measure() -> dict:
        gflops = {name: _gemm_gflops(device, dtype) for name, dtype in DTYPES.items()}
        fast_halves = [n for n in ("bfloat16", "float16") if gflops[n] >= _HALF_MIN_SPEEDUP * gflops["float32"]]
        choice = max(fast_halves, key=lambda n: gflops[n]) if fast_halves else "float32"
        logger.info("dtype probe on %s: %s -> %s", device_name(device), gflops, choice)
        return {"device": device_name(device), "gflops": gflops, "choice": choice}

    return DtypeProbe(**cached_probe(cache_dir, f"dtype | {device_key(device)}", measure))


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None) -> float:
    """The best GFLOP/s of a large square matmul in `dtype`: the denominator of MFU (cached per device)."""

    def measure() -> dict:
        return {"gflops": max(_gemm_gflops(device, dtype, n=1024, budget_s=0.5), 1e-9)}

    key = f"peak {str(dtype).removeprefix('torch.')} | {device_key(device)}"
    return float(cached_probe(cache_dir, key, measure)["gflops"])


def _gemm_gflops(device: torch.device, dtype: torch.dtype, n: int = 256, budget_s: float = 0.05) -> float:
    """GFLOP/s of an n*n*n matmul, best of a few runs within a small time budget (0.0 if unsupported)."""
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return 2 * n**3 / _best_time(device, lambda: torch.mm(a, b), budget_s) / 1e9
    except (RuntimeError, TypeError):
        return 0.0


def _best_time(device: torch.device, fn, budget_s: float) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: kernel selection, first touch
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    for _ in range(50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def device_key(device: torch.device) -> str:
    cpu = f"{_cpu_flags_key()} | {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{device_name(device)} | {cpu} | torch {torch.__version__}"


def cached_probe(cache_dir: Path | None, key: str, measure) -> dict:  # type: ignore[no-untyped-def]
    """A measurement kept in LAMINA_HOME/cache/probes.json, so each machine pays for it once."""
    cache_file = cache_dir / "probes.json" if cache_dir else None
    cached: dict[str, dict] = {}
    if cache_file and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    if key in cached:
        return cached[key]
    result = measure()
    if cache_file:
        cached[key] = result
        atomic_write_text(cache_file, json.dumps(cached, indent=2))
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None keeps the default: one per physical core); returns the count."""
    if threads is not None:
        if threads < 1:
            raise InvalidRequestError(f"threads must be >= 1 (got {threads})", param="threads")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextmanager
def serial() -> Iterator[None]:
    """PyTorch's CPU ops on this thread run on this thread alone inside the block (its thread count is put back
    after).

    For the small ops between two native decode steps (stacking and sampling a batch's logits): a parallel op
    wakes OpenMP's workers, which then spin for the next one for up to milliseconds, on the cores the native
    kernels' own threads decode on. Measured on a 2-core Intel Xeon: one `torch.stack` of a 49,152-float row
    between steps took a 6.6 ms decode step to 14 ms. Setting the count costs under a microsecond and is
    OpenMP's per-thread setting: threads already running PyTorch keep theirs (one that first touches PyTorch
    inside the block starts with PyTorch's global count, which the block also sets, at 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def device_name(device: torch.device) -> str:
    """A human name: the CPU model, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The SIMD features that decide which kernels are fast (from /proc/cpuinfo where there is one)."""
    interesting = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                   "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in interesting if name in flags]
    except OSError:
        pass
    return []


def _cpu_flags_key() -> str:
    return ",".join(cpu_features()) or platform.machine()


@dataclass(frozen=True)
class DeviceInfo:
    """One device as `lamina info` shows it."""

    name: str
    kind: str
    model: str
    memory_bytes: int | None
    detail: str


def list_devices() -> list[DeviceInfo]:
    """Every device torch can use here, CPU first."""
    import psutil

    cpu = torch.device("cpu")
    devices = [
        DeviceInfo(
            name="cpu",
            kind="cpu",
            model=cpu_model(),
            memory_bytes=psutil.virtual_memory().total,
            detail=f"{psutil.cpu_count(logical=False) or os.cpu_count()} cores; "
            f"{' '.join(cpu_features()) or 'no SIMD flags read'}; torch {torch.backends.cpu.get_cpu_capability()}",
        )
    ]
    del cpu
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            DeviceInfo(
                name=f"cuda:{index}",
                kind="cuda",
                model=props.name,
                memory_bytes=props.total_memory,
                detail=f"compute capability {props.major}.{props.minor}",
            )
        )
    if torch.backends.mps.is_available():
        devices.append(DeviceInfo(name="mps", kind="mps", model=device_name(torch.device("mps")), memory_bytes=None, detail=""))
    return devices


def optimize_for_inference(model: nn.Module, device: torch.device, cache_dir: Path | None = None) -> nn.Module:
    """Lay out Linear weights the way this device's batch-1 matmul reads fastest.

    Decoding multiplies one row of activations by every weight matrix, so its speed is the speed of the
    matrix-vector kernel. Which memory layout that kernel reads fastest depends on the CPU and the dtype
    (measured here: fp32 input-major, `W.t().contiguous().t()`, about 1.4x faster than row-major; bf16 the
    other way round), so it is measured once per device and dtype and cached. Values, shapes and
    `state_dict` names are unchanged; prefill GEMMs run equally fast in both layouts.
    """
    if device.type != "cpu":
        return model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return model
    dtype = linears[0].weight.dtype
    if probe_linear_layout(device, dtype, cache_dir) == "input_major":
        with torch.no_grad():
            for module in linears:
                if module.weight.is_contiguous():
                    module.weight.data = module.weight.data.t().contiguous().t()
    return model


def probe_linear_layout(device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None) -> str:
    """`row_major` or `input_major`: the faster weight layout for a batch-1 `F.linear` in `dtype`."""

    def measure() -> dict:
        # Big enough to stream from memory (not cache), shaped like a decoder MLP.
        w = torch.randn(8 * 1536, 576, device=device).to(dtype)
        x = torch.randn(1, 576, device=device).to(dtype)
        w_t = w.t().contiguous().t()
        row = _best_time(device, lambda: torch.nn.functional.linear(x, w), 0.05)
        col = _best_time(device, lambda: torch.nn.functional.linear(x, w_t), 0.05)
        return {"layout": "input_major" if col < 0.9 * row else "row_major", "row_major_s": row, "input_major_s": col}

    key = f"layout {str(dtype).removeprefix('torch.')} | {device_key(device)}"
    return str(cached_probe(cache_dir, key, measure)["layout"])

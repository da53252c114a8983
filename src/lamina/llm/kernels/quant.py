"""Weight-only quantisation for serving: int8 and int4 weights, through whichever kernel is fastest here.

Decoding is bound by how many weight bytes each token reads, so storing weights in 8 or 4 bits is the
way past the float memory wall, provided the matrix-vector kernel is fast on this machine. Which kernel is
fast varies by CPU (on an AVX2-only CPU PyTorch's int8/int4 kernels with fp32 activations were measured
5-25x slower than fp32 `linear`; with AVX-512 BF16, bf16 activations make them 3-4x faster), so nothing
is assumed: `choose_kernel` times every candidate on a model-shaped workload and the fastest wins,
including plain float `linear` (in which case quantising is refused with the numbers, rather than made
slower). The choice is cached per machine in LAMINA_HOME.

Candidates:
- native (`lamina.llm.kernels.native`, compiled on first use): llama.cpp-style blocks of 32 weights with an fp16
  scale, int4 with an offset (like Q4_1) or int8 (like Q8_0), and int8-quantised activations, so every
  block is an integer dot product; also the only one the fused decode step (`native_decode`) runs on;
- PyTorch's own CPU kernels: `torch._weight_int8pack_mm` (int8 per output channel) and
  `torch._weight_int4pack_mm_for_cpu` (int4 in groups of 32, tinygemm layout), each with bf16 or fp32
  activations (torchao's CPU paths wrap the same ops).
The embedding stays in float (a lookup reads one row); a tied `lm_head` gets its own quantised copy, in
int8 even under int4: the output head is the layer most sensitive to quantisation (llama.cpp keeps it at 6 or
8 bits too). Measured on SmolLM2 (bench/quant.py): an int4 head cost +5.4 % perplexity, an int8 one +0.2 %.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.arch.kv_cache import SlotCache
from lamina.arch.llama import Llama, LlamaConfig
from lamina.errors import InvalidRequestError
from lamina.infra.device import cached_probe, device_key, optimize_for_inference
from lamina.llm.kernels import native

logger = logging.getLogger(__name__)

Mode = Literal["int8", "int4"]
GROUP = 32


@dataclass(frozen=True)
class Kernel:
    mode: Mode
    activation: torch.dtype  # what the input is cast to (the native kernels take float32)
    backend: Literal["torch", "native"] = "torch"

    @property
    def name(self) -> str:
        if self.backend == "native":
            return f"{self.mode}-native"
        return f"{self.mode}-{str(self.activation).removeprefix('torch.')}"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale (out,)): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int4 weight for `_weight_int4pack_mm_for_cpu`, scales_and_zeros (in/group, out, 2)).

    Asymmetric per group of `group` inputs: w ≈ q * scale + min with q in 0..15, stored in the kernel's
    convention (q - 8) * scale + zero, so zero = min + 8 * scale.
    """
    w = weight.detach().float()
    out_features, in_features = w.shape
    if in_features % group:
        raise InvalidRequestError(f"int4 needs input sizes divisible by {group} (got {in_features})")
    wg = w.reshape(out_features, in_features // group, group)
    low, high = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - low) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack([scale[..., 0].t(), (low + 8 * scale)[..., 0].t()], dim=-1).contiguous()
    return packed, scales_zeros


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored in int8 or int4; the output keeps the input's dtype."""

    gemm_rows: int = 1 << 30
    """Native kernels: inputs of at least this many rows expand the weight to floats and use the float GEMM."""

    def __init__(self, linear: nn.Linear, kernel: Kernel, cache_dir: Path | None = None, blocks: torch.Tensor | None = None) -> None:
        """`blocks`: the weight already in the native format (a GGUF's Q4_1/Q8_0 bytes), used as they are."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.activation, self.backend = kernel.mode, kernel.activation, kernel.backend
        act = kernel.activation
        self.lib = native.library(cache_dir) if kernel.backend == "native" else None
        if self.backend == "native":
            if self.lib is None:
                raise InvalidRequestError(f"native kernels unavailable: {native.unavailable_reason()}", param="quantize")
            self.fmt = native.Q4 if kernel.mode == "int4" else native.Q8
            pack = native.pack_q4 if kernel.mode == "int4" else native.pack_q8
            self.register_buffer("blocks", blocks if blocks is not None else pack(linear.weight))
        elif kernel.mode == "int8":
            q, scale = quantize_int8(linear.weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale.to(act))
        else:
            packed, scales_zeros = quantize_int4(linear.weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", scales_zeros.to(act))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, self.in_features).to(self.activation)
        if self.lib is not None and flat.shape[0] >= self.gemm_rows:  # a prompt: compute-bound, the float GEMM wins
            gemm = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            w = native.dequantize(self.lib, self.fmt, self.blocks, self.in_features, gemm)
            y = F.linear(x.reshape(-1, self.in_features).to(gemm), w)
        elif self.lib is not None:
            y = native.matmul(self.lib, self.fmt, self.blocks, self.in_features, flat.contiguous())
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, GROUP, self.scales)
        y = y.to(dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)


def choose_kernel(
    mode: Mode, float_dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None, config: LlamaConfig | None = None
) -> tuple[Kernel | None, dict]:
    """The fastest kernel for `mode` on this machine, or None when the float `linear` is faster.

    With the `config` of a Llama-family model, candidates are timed on what serving does: decode steps of a
    4-layer model of that width, the native kernel through the fused step (`native_decode`); otherwise on
    batch-1 matmuls of a decoder's shapes.
    """
    if device.type != "cpu":
        raise InvalidRequestError("weight-only quantisation runs on CPU kernels; on a GPU serve in bfloat16", param="quantize")

    candidates = [Kernel(mode, torch.bfloat16), Kernel(mode, torch.float32)]
    if native.library(cache_dir) is not None:
        candidates.insert(0, Kernel(mode, torch.float32, "native"))
    if config is not None and (config.moe is not None or config.dim % GROUP or config.hidden_dim % GROUP):
        config = None
    if config is not None:
        config = probe_config(config)

    def measure() -> dict:
        if config is not None:
            times = {"float": time_decode(config, float_dtype, None, cache_dir)}
            for kernel in candidates:
                times[kernel.name] = time_decode(config, float_dtype, kernel, cache_dir)
            return {"seconds": times, "workload": "8 decode steps of a 4-layer model"}
        shapes = [(1536, 576), (576, 1536), (576, 576)] * 8  # several MB each: streamed, like a decoder's weights
        times = {"float": _time_float(shapes, float_dtype)}
        for kernel in candidates:
            times[kernel.name] = _time_quant(shapes, kernel, cache_dir)
        return {"seconds": times, "workload": "24 batch-1 matmuls"}

    names = "+".join(k.name for k in candidates)
    shape = f"llama {config.dim}x{config.hidden_dim} {config.n_heads}/{config.n_kv_heads} heads" if config else "matmuls"
    key = f"quant {names} vs {str(float_dtype).removeprefix('torch.')} on {shape} | {device_key(device)}"
    seconds = cached_probe(cache_dir, key, measure)["seconds"]
    best = min(seconds, key=seconds.get)
    if best == "float":
        return None, seconds
    return next(k for k in candidates if k.name == best), seconds


def gemm_rows(kernel: Kernel, float_dtype: torch.dtype, cache_dir: Path | None = None) -> int:
    """From how many input rows expanding native blocks to floats for the float GEMM beats integer dots."""
    if kernel.backend != "native":
        return 1 << 30
    gemm = float_dtype if float_dtype in (torch.float32, torch.bfloat16) else torch.float32

    def measure() -> dict:
        shapes = [(1536, 576), (576, 1536), (576, 576)]
        for rows in (8, 16, 32, 64, 128, 256):
            int_path = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir) for o, i in shapes]
            float_path = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir) for o, i in shapes]
            for layer in float_path:
                layer.gemm_rows = 1
            xs = [torch.randn(rows, i, dtype=gemm) for _, i in shapes]
            t_int = _best(lambda: [f(x) for f, x in zip(int_path, xs, strict=True)])  # noqa: B023
            t_float = _best(lambda: [f(x) for f, x in zip(float_path, xs, strict=True)])  # noqa: B023
            if t_float < t_int:
                return {"rows": rows}
        return {"rows": 1 << 30}

    key = f"native {kernel.mode} gemm rows, {str(gemm).removeprefix('torch.')} | {device_key(torch.device('cpu'))}"
    return int(cached_probe(cache_dir, key, measure)["rows"])


def probe_config(config: LlamaConfig) -> LlamaConfig:
    """A 4-layer, small-vocabulary model of `config`'s width: what kernel probes time decode steps on."""
    return replace(config, n_layers=4, vocab_size=4096, max_seq_len=256, tie_embeddings=False, rope_scaling=None)


def time_decode(
    config: LlamaConfig, dtype: torch.dtype, kernel: Kernel | None, cache_dir: Path | None, native_step: bool = False
) -> float:
    """Seconds for 8 batch-1 decode steps of a random model of `config`: with `kernel`'s QuantLinears (None:
    float weights, in PyTorch's best layout unless `native_step`), through the native step where the kernel is
    native or `native_step` asks for it (inf where that does not apply), else PyTorch's forward."""
    from lamina.llm.kernels.native_decode import NativeDecoder  # (it builds on QuantLinear)

    torch.manual_seed(0)
    model = Llama(config).to(dtype).eval()
    try:
        if kernel is not None:
            _replace_linears(model, kernel, kernel, cache_dir)
    except (RuntimeError, NotImplementedError) as e:  # a kernel this build of torch does not have
        logger.info("quantised kernel %s unavailable: %s", kernel, e)
        return float("inf")
    decoder = None
    if native_step or (kernel is not None and kernel.backend == "native"):
        decoder = NativeDecoder.for_model(model, cache_dir)
        if decoder is None:
            return float("inf")
    elif kernel is None:
        optimize_for_inference(model, torch.device("cpu"), cache_dir)
    tokens = torch.tensor([[1]])

    def steps() -> None:
        if decoder is not None:
            slots = SlotCache(config.n_layers, config.n_kv_heads, config.head_dim, dtype=dtype, device="cpu")  # type: ignore[arg-type]
            slots.reserve(1, 64)
            for _ in range(8):
                decoder.decode(tokens, slots, 1)
        else:
            cache = model.new_cache(1, 64)
            for _ in range(8):
                model(tokens, cache)

    return _best(steps)


def _time_float(shapes: list[tuple[int, int]], dtype: torch.dtype) -> float:
    layers = [nn.Linear(i, o, bias=False).to(dtype) for o, i in shapes]
    return _best(lambda: [layer(torch.randn(1, layer.in_features, dtype=dtype)) for layer in layers])


def _time_quant(shapes: list[tuple[int, int]], kernel: Kernel, cache_dir: Path | None) -> float:
    try:
        layers = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir) for o, i in shapes]
        return _best(lambda: [layer(torch.randn(1, layer.in_features)) for layer in layers])
    except (RuntimeError, NotImplementedError) as e:  # a kernel this build of torch does not have
        logger.info("quantised kernel %s unavailable: %s", kernel, e)
        return float("inf")


def _best(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def quantize_model(
    model: nn.Module, mode: Mode, cache_dir: Path | None = None, stored: dict[str, tuple[int, torch.Tensor]] | None = None
) -> dict:
    """Replace every Linear (and the output head) with a QuantLinear using the measured-fastest kernel.

    `stored`: weights the checkpoint already holds in a native block format (`gguf.native_blocks`); where
    the chosen kernel is native and the format matches, those bytes are used instead of re-packing.
    """
    ref = next(model.parameters())
    config = model.config if isinstance(model, Llama) else None
    kernel, seconds = choose_kernel(mode, ref.dtype, ref.device, cache_dir, config)
    shown = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items())
    if kernel is None:
        raise InvalidRequestError(
            f"--quantize {mode} would be slower than {str(ref.dtype).removeprefix('torch.')} on this machine "
            f"(measured: {shown}); serve without --quantize", param="quantize")
    head_kernel: Kernel | None = kernel
    if mode == "int4":  # the head in int8, with the same backend where it has one
        head_kernel = Kernel("int8", kernel.activation, kernel.backend)
    if stored and isinstance(model, Llama) and model.config.tie_embeddings and "embed_tokens.weight" in stored:
        stored = {**stored, "lm_head.weight": stored["embed_tokens.weight"]}
    replaced, reused = _replace_linears(model, kernel, head_kernel, cache_dir, gemm_rows(kernel, ref.dtype, cache_dir), stored or {})
    logger.info("quantised %d linear layers to %s with the %s kernel, %d from the checkpoint's own blocks (%s)",
                replaced, mode, kernel.name, reused, shown)
    return {"mode": mode, "kernel": kernel.name, "layers": replaced, "from_checkpoint": reused, "seconds": seconds}


def _replace_linears(
    model: nn.Module, kernel: Kernel, head_kernel: Kernel, cache_dir: Path | None, rows: int = 1 << 30,
    stored: dict[str, tuple[int, torch.Tensor]] | None = None,
) -> tuple[int, int]:
    """(layers replaced, of which built from `stored` blocks)."""
    replaced = reused = 0
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.in_features % GROUP:
                continue
            chosen = head_kernel if child_name == "lm_head" else kernel
            fmt = native.Q4 if chosen.mode == "int4" else native.Q8
            name = f"{module_name}.{child_name}.weight" if module_name else f"{child_name}.weight"
            have = (stored or {}).get(name)
            expected = (child.out_features, child.in_features // GROUP * native.BLOCK_BYTES[fmt])
            blocks = have[1] if have and chosen.backend == "native" and have[0] == fmt and tuple(have[1].shape) == expected else None
            layer = QuantLinear(child, chosen, cache_dir, blocks=blocks)
            layer.gemm_rows = rows
            setattr(module, child_name, layer)
            replaced += 1
            reused += blocks is not None
    return replaced, reused

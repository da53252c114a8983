"""Weight-only quantisation for serving: int8 and int4 weights, through whichever kernel is fastest here.

Decoding is bound by how many weight bytes each token reads, so storing weights in 8 or 4 bits is the
way past the float memory wall, provided the matrix-vector kernel is fast on this machine. Which kernel is
fast varies by CPU (on an AVX2-only CPU PyTorch's int8/int4 kernels with fp32 activations were measured
5-25x slower than fp32 `linear`; with AVX-512 BF16, bf16 activations make them 3-4x faster), so nothing
is assumed: `choose_kernel` times every candidate on a model-shaped workload and the fastest wins,
including plain float `linear` (in which case quantising is refused with the numbers, rather than made
slower). The choice is cached per machine in LAMINA_HOME.

Candidates (the `Kernel`s of `QuantLinear`, in `linear`):
- native (`lamina.llm.kernels.native`, compiled on first use): llama.cpp-style blocks of 32 weights with an fp16
  scale, int4 with an offset (like Q4_1) or int8 (like Q8_0), and int8-quantised activations, so every
  block is an integer dot product; also the only one the fused decode step (`native_decode`) runs on;
- PyTorch's own CPU kernels: `torch._weight_int8pack_mm` (int8 per output channel) and
  `torch._weight_int4pack_mm_for_cpu` (int4 in groups of 32, tinygemm layout), each with bf16 or fp32
  activations (torchao's CPU paths wrap the same ops).
The workloads they are timed on are in `timing`.
The embedding stays in float (a lookup reads one row); a tied `lm_head` gets its own quantised copy, in
int8 even under int4: the output head is the layer most sensitive to quantisation (llama.cpp keeps it at 6 or
8 bits too). Measured on SmolLM2 (bench/quant.py): an int4 head cost +5.4 % perplexity, an int8 one +0.2 %.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lamina.arch.llama import Llama, LlamaConfig
from lamina.errors import InvalidRequestError
from lamina.infra.device import cached_probe, device_key
from lamina.llm.kernels import native
from lamina.llm.kernels.linear import GROUP, Kernel, Mode, QuantLinear, replace_linears
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions
from lamina.llm.kernels.native_decode import NativeDecoder
from lamina.llm.kernels.timing import (
    best_times_alternating,
    probe_config,
    time_decode,
    time_float_matmuls,
    time_prompt_chunks,
    time_quant_matmuls,
)

__all__ = ["Kernel", "Mode", "QuantLinear", "choose_kernel", "gemm_rows", "quantize_model"]

logger = logging.getLogger(__name__)


def choose_kernel(
    mode: Mode, float_dtype: torch.dtype, device: torch.device, cache_dir: Path | None = None, config: LlamaConfig | None = None,
    options: NativeOptions = DEFAULT_OPTIONS, native_only: bool = False,
) -> tuple[Kernel | None, dict]:
    """The fastest kernel for `mode` on this machine, or None when the float `linear` is faster.

    With the `config` of a Llama-family model, candidates are timed on what serving does: decode steps of a
    4-layer model of that width, the native kernel through the fused step (`native_decode`); otherwise on
    batch-1 matmuls of a decoder's shapes.
    """
    if device.type != "cpu":
        raise InvalidRequestError("weight-only quantisation runs on CPU kernels; on a GPU serve in bfloat16", param="quantize")

    candidates = [] if native_only else [Kernel(mode, torch.bfloat16), Kernel(mode, torch.float32)]
    if native.library(cache_dir, options) is not None:
        candidates.insert(0, Kernel(mode, torch.float32, "native"))
    if not candidates:
        raise InvalidRequestError(f"the native kernels are unavailable: {native.unavailable_reason(options)}", param="quantize")
    if config is not None and (config.moe is not None or config.dim % GROUP or config.hidden_dim % GROUP):
        config = None
    if config is not None:
        config = probe_config(config)

    def native_step(model: Llama) -> NativeDecoder | None:
        return NativeDecoder.for_model(model, cache_dir, options)

    def measure() -> dict:
        if config is not None:
            times = {"float": time_decode(config, float_dtype, None, cache_dir)}
            for kernel in candidates:
                step = native_step if kernel.backend == "native" else None
                times[kernel.name] = time_decode(config, float_dtype, kernel, cache_dir, step, options)
            return {"seconds": times, "workload": "8 decode steps of a 4-layer model"}
        shapes = [(1536, 576), (576, 1536), (576, 576)] * 8  # several MB each: streamed, like a decoder's weights
        times = {"float": time_float_matmuls(shapes, float_dtype)}
        for kernel in candidates:
            times[kernel.name] = time_quant_matmuls(shapes, kernel, cache_dir, options)
        return {"seconds": times, "workload": "24 batch-1 matmuls"}

    names = "+".join(k.name for k in candidates)
    shape = f"llama {config.dim}x{config.hidden_dim} {config.n_heads}/{config.n_kv_heads} heads" if config else "matmuls"
    key = f"quant {names} vs {str(float_dtype).removeprefix('torch.')} on {shape} | {native.source_key()} | {device_key(device)}"
    seconds = cached_probe(cache_dir, key, measure)["seconds"]
    best = min(seconds, key=seconds.get)
    if best == "float":
        return None, seconds
    return next(k for k in candidates if k.name == best), seconds


def gemm_rows(
    kernel: Kernel, float_dtype: torch.dtype, cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS,
    config: LlamaConfig | None = None,
) -> int:
    """From how many input rows expanding native blocks to floats for the float GEMM beats integer dots.

    Measured from the longest input down, while the float GEMM keeps winning: the answer is where it last won
    (a suffix of wins is not one noisy timing; going up and taking the first win, three fresh processes on a
    2-core AMD EPYC answered 512, 128 and 8). With a Llama `config`, on prompt chunks of a 2-layer model of its
    width (`time_prompt_chunks`), 512 down to 64 tokens (shorter chunks take the fused native step): timed alone,
    the matmuls miss what a model puts between them, PyTorch's threads spinning on the cores after each of its
    operations, which the native calls then meet. Timed alone they favoured integer dots at 512 rows (2.4
    against 2.8 ms) where a 2,048-token prefill took 1.85 s on them and 1.3 s on the float GEMM.
    """
    if kernel.backend != "native":
        return 1 << 30
    gemm = float_dtype if float_dtype in (torch.float32, torch.bfloat16) else torch.float32
    if config is not None and (config.moe is not None or config.dim % GROUP or config.hidden_dim % GROUP):
        config = None

    def measure() -> dict:
        found = 1 << 30
        if config is not None:
            for rows, t_int, t_float in time_prompt_chunks(config, gemm, kernel, cache_dir, (512, 256, 128, 64), options):
                if t_float >= t_int:
                    break
                found = rows
            return {"rows": found, "workload": "prompt chunks of a 2-layer model"}
        shapes = [(1536, 576), (576, 1536), (576, 576)]
        int_path = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir, options=options) for o, i in shapes]
        float_path = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir, options=options) for o, i in shapes]
        for layer in float_path:
            layer.gemm_rows = 1
        for rows in (512, 256, 128, 64, 32, 16, 8):
            xs = [torch.randn(rows, i, dtype=gemm) for _, i in shapes]
            t_int, t_float = best_times_alternating(lambda: [f(x) for f, x in zip(int_path, xs, strict=True)],  # noqa: B023
                                                    lambda: [f(x) for f, x in zip(float_path, xs, strict=True)])  # noqa: B023
            if t_float >= t_int:
                break
            found = rows
        return {"rows": found, "workload": "matmuls"}

    shape = f"llama {config.dim}x{config.hidden_dim} {config.n_heads}/{config.n_kv_heads} heads" if config else "matmuls"
    key = (f"native {kernel.mode} gemm rows from 512 down, {str(gemm).removeprefix('torch.')} on {shape} | {native.source_key()} | "
           f"{device_key(torch.device('cpu'))}")
    return int(cached_probe(cache_dir, key, measure)["rows"])


def quantize_model(
    model: nn.Module, mode: Mode, cache_dir: Path | None = None, stored: dict[str, tuple[int, torch.Tensor]] | None = None,
    options: NativeOptions = DEFAULT_OPTIONS, native_only: bool = False,
) -> dict:
    """Replace every Linear (and the output head) with a QuantLinear using the measured-fastest kernel.

    `stored`: weights the checkpoint already holds in a native block format (`gguf.native_blocks`); where
    the chosen kernel is native and the format matches, those bytes are used instead of re-packing.
    `native_only`: consider the native kernels alone (serving the stored blocks as they are, or nothing).
    """
    ref = next(model.parameters())
    config = model.config if isinstance(model, Llama) else None
    kernel, seconds = choose_kernel(mode, ref.dtype, ref.device, cache_dir, config, options, native_only)
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
    rows = gemm_rows(kernel, ref.dtype, cache_dir, options, config)
    replaced, reused = replace_linears(model, kernel, head_kernel, cache_dir, rows, stored or {}, options)
    logger.info("quantised %d linear layers to %s with the %s kernel, %d from the checkpoint's own blocks (%s)",
                replaced, mode, kernel.name, reused, shown)
    return {"mode": mode, "kernel": kernel.name, "layers": replaced, "from_checkpoint": reused, "seconds": seconds}

"""Timing probes behind the kernel choices: decode steps of a small model of a real one's width, and matmuls.

Which kernel is fastest, and whether the native step beats PyTorch's forward, depends on the machine, so
`quant.choose_kernel`, `quant.gemm_rows` and `native_decode.native_float_pays` all measure. They share these
workloads, best of several after a warm-up. The native step is handed in (`decoder_for`) rather than imported,
so this module sits below both the quantisation and the decode-step modules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lamina.arch.kv_cache import SlotCache
from lamina.arch.llama import Llama, LlamaConfig
from lamina.infra.device import optimize_for_inference
from lamina.llm.kernels.linear import Kernel, QuantLinear, replace_linears
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions

logger = logging.getLogger(__name__)


class DecodeStep(Protocol):
    """A native decode step (`NativeDecoder`): logits for one new token in each of rows 0..rows-1."""

    def decode(self, tokens: torch.Tensor, cache: SlotCache, rows: int) -> torch.Tensor: ...


def probe_config(config: LlamaConfig) -> LlamaConfig:
    """A 4-layer, small-vocabulary model of `config`'s width: what kernel probes time decode steps on."""
    return replace(config, n_layers=4, vocab_size=4096, max_seq_len=256, tie_embeddings=False, rope_scaling=None)


def time_decode(
    config: LlamaConfig, dtype: torch.dtype, kernel: Kernel | None, cache_dir: Path | None,
    decoder_for: Callable[[Llama], DecodeStep | None] | None = None, options: NativeOptions = DEFAULT_OPTIONS,
) -> float:
    """Seconds for 8 batch-1 decode steps of a random model of `config`, with `kernel`'s QuantLinears (None:
    float weights, in PyTorch's best layout unless the steps go native).

    `decoder_for` (e.g. `NativeDecoder.for_model`): the steps run through the native step it builds for the
    model (inf where it builds none); without it, through PyTorch's forward.
    """
    torch.manual_seed(0)
    model = Llama(config).to(dtype).eval()
    try:
        if kernel is not None:
            replace_linears(model, kernel, kernel, cache_dir, options=options)
    except (RuntimeError, NotImplementedError) as e:  # a kernel this build of torch does not have
        logger.info("quantised kernel %s unavailable: %s", kernel, e)
        return float("inf")
    decoder = None
    if decoder_for is not None:
        decoder = decoder_for(model)
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

    return best_time(steps)


def time_prompt_chunks(
    config: LlamaConfig, dtype: torch.dtype, kernel: Kernel, cache_dir: Path | None, rows: Sequence[int],
    options: NativeOptions = DEFAULT_OPTIONS,
) -> Iterator[tuple[int, float, float]]:
    """(rows, integer dots, float GEMM) for each of `rows` in turn: seconds for one prompt chunk of that many
    tokens through a random 2-layer model of `config` whose QuantLinears on native `kernel` take each path, as
    the engine's prompt chunks do (norms, rotary embeddings and attention between the matmuls, on PyTorch's
    threads), the two timed in turns (`best_times_alternating`). A generator:
    the caller stops it when it has its answer."""
    torch.manual_seed(0)
    config = replace(probe_config(config), n_layers=2, max_seq_len=max(max(rows), 256))
    model = Llama(config).to(dtype).eval()
    replace_linears(model, kernel, kernel, cache_dir, options=options)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]

    def chunk(tokens: torch.Tensor, gemm_rows: int) -> Callable[[], None]:
        def run() -> None:
            for layer in layers:
                layer.gemm_rows = gemm_rows
            model(tokens, model.new_cache(1, tokens.shape[1]), last_only=True)
        return run

    for n in rows:
        tokens = torch.randint(0, config.vocab_size, (1, n))
        yield n, *best_times_alternating(chunk(tokens, 1 << 30), chunk(tokens, 1), rounds=2, repeats=2)


def time_float_matmuls(shapes: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """Seconds for batch-1 float `linear`s of these (out, in) shapes."""
    layers = [nn.Linear(i, o, bias=False).to(dtype) for o, i in shapes]
    return best_time(lambda: [layer(torch.randn(1, layer.in_features, dtype=dtype)) for layer in layers])


def time_quant_matmuls(
    shapes: list[tuple[int, int]], kernel: Kernel, cache_dir: Path | None, options: NativeOptions = DEFAULT_OPTIONS
) -> float:
    """Seconds for batch-1 QuantLinears on `kernel` of these (out, in) shapes; inf where torch lacks the kernel."""
    try:
        layers = [QuantLinear(nn.Linear(i, o, bias=False), kernel, cache_dir, options=options) for o, i in shapes]
        return best_time(lambda: [layer(torch.randn(1, layer.in_features)) for layer in layers])
    except (RuntimeError, NotImplementedError) as e:  # a kernel this build of torch does not have
        logger.info("quantised kernel %s unavailable: %s", kernel, e)
        return float("inf")


def best_times_alternating(a: Callable[[], object], b: Callable[[], object], rounds: int = 3, repeats: int = 3) -> tuple[float, float]:
    """The fastest runs of `a` and of `b`, timed in turns (`rounds` of `best_time` each), so that a slow spell of
    the machine meets both rather than one."""
    t_a = t_b = float("inf")
    for _ in range(rounds):
        t_a = min(t_a, best_time(a, repeats))
        t_b = min(t_b, best_time(b, repeats))
    return t_a, t_b


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of `repeats` runs of `fn` in seconds, after one warm-up run, under inference mode."""
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)

"""One native call per decode step for a Llama-family model, quantised or float (`lam_llama_decode` in csrc).

The layer-by-layer PyTorch forward of a 30-layer model issues ~600 small ops per token; at batch 1 on a
CPU their dispatch costs more than the matmuls themselves. `NativeDecoder` hands the whole step (every
layer's norm, q/k/v, RoPE, KV-cache write, attention, o_proj, SwiGLU, the final norm and the output head)
to C in one call, over the weights the model already holds (the native blocks of its `QuantLinear`s, or
the float32/bfloat16 weights of plain `nn.Linear`s, read as they are) and the same `SlotCache` rows the
engine keeps, so prefill (PyTorch, chunked) and decode (native) share one cache.

It applies where it is exact for the model: a dense Llama-family decoder (Llama, SmolLM2, Mistral's sliding
window, Qwen2's q/k/v biases, GQA/MQA) whose linear layers are all native blocks or float32/bfloat16
weights, on CPU. LoRA adapters on the seven projections run inside the step too, each row under its own
adapter or none (S-LoRA / Punica style: the base weights are read once for every row, each adapter's two thin
matrices only for its rows); an adapter on the output head, or one merged into the base weights, is left to
PyTorch. `NativeDecoder.for_model` says None where the step does not apply, and the engine uses the PyTorch
forward. Quantised models take the step whenever it applies; float models where it was measured
faster than PyTorch's forward (`native_step_for`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch
from torch import nn

from lamina.arch.kv_cache import SlotCache
from lamina.arch.llama import Llama
from lamina.arch.lora import LoRALinear, adapter_names
from lamina.infra.device import cached_probe, device_key
from lamina.llm.kernels import native
from lamina.llm.kernels.linear import QuantLinear
from lamina.llm.kernels.native import DEFAULT_OPTIONS, DecodeConfig, NativeOptions
from lamina.llm.kernels.timing import probe_config, time_decode

logger = logging.getLogger(__name__)

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


_FLOAT_FMT = {torch.float32: native.F32, torch.bfloat16: native.BF16}


def _weight(m: nn.Module) -> tuple[int, int]:
    """(address, format) of a linear layer's weight as the C side reads it (a LoRA wrapper's: its base layer's)."""
    if isinstance(m, LoRALinear):
        m = m.base_layer
    if isinstance(m, QuantLinear):
        return m.blocks.data_ptr(), m.fmt
    assert isinstance(m, nn.Linear)
    return m.weight.data_ptr(), _FLOAT_FMT[m.weight.dtype]


def _native_weight(m: nn.Module) -> bool:
    if isinstance(m, LoRALinear):  # its adapters run in the step; a merged one is already in the base weight
        return m.merged_adapter is None and _native_weight(m.base_layer)
    if isinstance(m, QuantLinear):
        return m.lib is not None
    return type(m) is nn.Linear and m.weight.dtype in _FLOAT_FMT and m.weight.is_contiguous() and m.in_features % native.QK == 0


class NativeDecoder:
    """The fused decode step over one model's weights (build it with `for_model`)."""

    def __init__(self, model: Llama, lib: ctypes.CDLL) -> None:
        c = model.config
        assert c.head_dim is not None and c.n_kv_heads is not None
        self.model = model
        self.lib = lib
        self._keep: list[torch.Tensor] = []  # float32 copies the C side points at
        rows = []
        for block in model.layers:
            mods = [block.get_submodule(name) for name in _PROJ]
            weights = [_weight(m) for m in mods]
            ptrs = [w[0] for w in weights] + [w[1] for w in weights]
            ptrs += [self._f32(block.input_layernorm.weight), self._f32(block.post_attention_layernorm.weight)]
            ptrs += [self._f32(m.bias) if m.bias is not None else 0 for m in mods[:3]]
            rows.append(ptrs)
        self.layers = torch.tensor(rows, dtype=torch.int64)
        self._lora_table(model)
        self.final_norm = self._f32(model.norm.weight)  # (an address)
        self.inv_freq = model.inv_freq.float().contiguous()
        self.eps = float(c.norm_eps)
        self.shape = [c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size]
        self.window = c.sliding_window or 0

    def _lora_table(self, model: Llama) -> None:
        """The adapters' table for the C side (LORA_ENTRY in csrc): per layer, projection and adapter, the
        addresses of float32 copies of A * scaling and of B^T, and the rank; zeros where there is no adapter."""
        self.adapter_index = {name: j for j, name in enumerate(adapter_names(model))}
        n = len(self.adapter_index)
        self.max_rank = 0
        table = torch.zeros(len(model.layers), len(_PROJ), max(n, 1), 3, dtype=torch.int64)
        for li, block in enumerate(model.layers):
            for i, name in enumerate(_PROJ):
                m = block.get_submodule(name)
                if not isinstance(m, LoRALinear):
                    continue
                for adapter_name, adapter in m.adapters.items():
                    j = self.adapter_index[adapter_name]
                    a = self._f32(adapter.lora_A.detach().float() * adapter.scaling)
                    table[li, i, j] = torch.tensor([a, self._f32(adapter.lora_B.detach().t()), adapter.r])
                    self.max_rank = max(self.max_rank, adapter.r)
        self.lora = table.contiguous()

    @property
    def quantized(self) -> bool:
        return isinstance(self.model.lm_head, QuantLinear)

    @classmethod
    def for_model(cls, model: nn.Module, cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> NativeDecoder | None:
        """A decoder for `model`, or None where the native step does not apply (it then runs in PyTorch).

        Quantised models (native blocks) always qualify; float32/bfloat16 models qualify too, and the runner
        uses the step for them where it was measured faster (`native_float_pays`).
        """
        if not isinstance(model, Llama) or model.config.moe is not None:
            return None
        c = model.config
        assert c.head_dim is not None
        ref = model.embed_tokens.weight
        if ref.device.type != "cpu" or ref.dtype not in (torch.float32, torch.bfloat16) or c.head_dim % 8 or c.dim % 32 or c.hidden_dim % 32:
            return None
        linears = [block.get_submodule(name) for block in model.layers for name in _PROJ]
        head = model.lm_head
        if not all(_native_weight(m) for m in linears) or isinstance(head, LoRALinear) or not _native_weight(head):
            return None
        bases = [m.base_layer if isinstance(m, LoRALinear) else m for m in [*linears, head]]
        quantised = [m for m in bases if isinstance(m, QuantLinear)]
        lib = quantised[0].lib if quantised else native.library(cache_dir, options)
        return None if lib is None else cls(model, lib)

    def _f32(self, t: torch.Tensor) -> int:
        t = t.detach().float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: SlotCache, rows: int) -> torch.Tensor:
        """Logits (rows, vocab) float32 for one new token in each of rows 0..rows-1 of `cache`."""
        if rows > cache.slots:
            raise ValueError(f"{rows} rows do not fit the KV cache ({cache.slots} rows of {cache.capacity} positions)")
        logits = self.step(tokens.reshape(rows), list(range(rows)), list(cache.lengths[:rows]), list(range(rows)), cache)
        for b in range(rows):
            cache.lengths[b] += 1
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, slots: list[int], positions: list[int], logit_rows: list[int], cache: SlotCache,
             adapters: list[str | None] | None = None) -> torch.Tensor:
        """One forward over token rows: tokens[i] goes to cache row slots[i] at positions[i], under LoRA
        adapter adapters[i] (None, or no list: the base model).

        Rows of one slot may cover consecutive positions (a prompt chunk, fed with the decoding rows in the
        same call). Returns logits (len(logit_rows), vocab) float32 for the rows listed. The cache's
        `lengths` are left to the caller.
        """
        kv_dtype = cache.k.dtype  # (what the tensors hold, which the C side reads)
        if kv_dtype not in (torch.float32, torch.bfloat16) or cache.v.dtype != kv_dtype:
            raise ValueError(f"the native decode step keeps keys and values in float32 or bfloat16, not {kv_dtype}")
        m = len(positions)
        if not (len(tokens) == len(slots) == m):
            raise ValueError(f"{len(tokens)} tokens, {len(slots)} slots and {m} positions: one of each per row")
        x = self.model.embed_tokens(tokens.reshape(m)).float().contiguous()  # (m, dim), the residual stream
        slot_t = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        out_t = torch.tensor(logit_rows, dtype=torch.int64)
        logits = torch.empty(len(logit_rows), self.shape[-1], dtype=torch.float32)
        lora = 0
        row_adapter = None
        if adapters is not None and any(a is not None for a in adapters):
            if len(adapters) != m:
                raise ValueError(f"{len(adapters)} adapters for {m} rows: one (or None) per row")
            unknown = {a for a in adapters if a is not None and a not in self.adapter_index}
            if unknown:
                raise ValueError(f"no LoRA adapter named {sorted(unknown)} in this step (it has {sorted(self.adapter_index)})")
            row_adapter = torch.tensor([-1 if a is None else self.adapter_index[a] for a in adapters], dtype=torch.int64)
            lora = self.lora.data_ptr()
        head_ptr, head_fmt = _weight(self.model.lm_head)
        n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab = self.shape
        cfg = DecodeConfig(
            n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden=hidden, vocab=vocab,
            rows=m, slots=cache.slots, capacity=cache.capacity, kv_bf16=int(kv_dtype == torch.bfloat16), window=self.window,
            head_fmt=head_fmt, threads=torch.get_num_threads(), n_logits=len(logit_rows), eps=self.eps,
            n_adapters=len(self.adapter_index) if lora else 0, max_rank=self.max_rank if lora else 0, lora=lora,
            row_adapter=row_adapter.data_ptr() if row_adapter is not None else 0,
        )
        assert cache.k.is_contiguous() and cache.v.is_contiguous()
        status = self.lib.lam_llama_decode(
            ctypes.byref(cfg), self.layers.data_ptr(), self.final_norm, head_ptr,
            self.inv_freq.data_ptr(), x.data_ptr(), slot_t.data_ptr(), pos_t.data_ptr(), out_t.data_ptr(),
            cache.k.data_ptr(), cache.v.data_ptr(), logits.data_ptr(),
        )
        if status == native.LAM_ERR_RANGE:
            raise ValueError(f"rows at slots {slots} and positions {positions} (logits for {logit_rows}) do not fit the KV "
                             f"cache ({cache.slots} rows of {cache.capacity} positions)")
        native.raise_for_status(status, f"a native decode step of {m} rows")
        return logits


def native_step_for(model: nn.Module, cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> NativeDecoder | None:
    """The native step the engine should run `model`'s decoding on, or None for PyTorch's forward.

    Quantised models (native blocks) take it whenever it applies; float models where it was measured faster
    than PyTorch's forward, after their weights are put back in the row-major layout it reads.
    """
    if not isinstance(model, Llama):
        return None
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return NativeDecoder.for_model(model, cache_dir, options)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ref = model.embed_tokens.weight
    if ref.device.type != "cpu" or ref.dtype not in _FLOAT_FMT or any(type(m) is not nn.Linear for m in linears):
        return None
    if native.library(cache_dir, options) is None or not native_float_pays(model, cache_dir, options)["use"]:
        return None
    with torch.no_grad():
        for m in linears:  # (optimize_for_inference may have stored fp32 weights input-major)
            if not m.weight.is_contiguous():
                m.weight.data = m.weight.data.contiguous()
    return NativeDecoder.for_model(model, cache_dir, options)


def native_float_pays(model: Llama, cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> dict:
    """Time decode steps of a 4-layer model of `model`'s shape and dtype: PyTorch's forward (at its best weight
    layout) against the native step (cached per machine). {"native_s", "pytorch_s", "use": bool}."""
    c = model.config
    dtype = model.embed_tokens.weight.dtype
    small = probe_config(c)

    def native_step(probe: Llama) -> NativeDecoder | None:
        return NativeDecoder.for_model(probe, cache_dir, options)

    def measure() -> dict:
        native_s = time_decode(small, dtype, None, cache_dir, native_step, options)
        pytorch_s = time_decode(small, dtype, None, cache_dir)
        return {"native_s": native_s, "pytorch_s": pytorch_s, "use": native_s < pytorch_s}

    key = f"native decode step, {c.dim}x{c.hidden_dim} {c.n_heads}/{c.n_kv_heads} heads {dtype} | {native.source_key()} | {device_key(torch.device('cpu'))}"
    return cached_probe(cache_dir, key, measure)


def use_native_prompt_attention(model: nn.Module, cache_dir: Path | None = None, options: NativeOptions = DEFAULT_OPTIONS) -> bool:
    """Give a CPU Llama model's prompt chunks the native attention kernel (`native.prompt_attention`) where this
    build has one (AVX-512); returns whether it did. Measured on a 2-core Xeon (Emerald Rapids), a 512-query chunk
    of SmolLM2's attention (9 heads over 3 kv heads of 64): 1.8 ms against SDPA's 3.3 over 512 keys, 47 against 60
    over 8,000 (200 GFLOP/s, SDPA's flash kernel 155). On a 2-core AMD EPYC (AVX-512-BF16) over 8,000 keys: float32
    306 GFLOP/s against SDPA's 120; bfloat16 queries over the bfloat16 cache (the default `lamina serve`: int4
    weights, bfloat16 activations) through the bfloat16 dot products 472 against SDPA's 124.
    """
    if not isinstance(model, Llama) or model.embed_tokens.weight.device.type != "cpu":
        return False
    lib = native.library(cache_dir, options)
    if lib is None or not lib.lam_has_prompt_attention():
        return False
    kernel = functools.partial(native.prompt_attention, lib)
    for layer in model.layers:
        layer.self_attn.prompt_attention = kernel
    return True

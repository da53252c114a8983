"""`QuantLinear`, the Linear layer with int8 or int4 weights, and the kernels it can run on.

A `Kernel` names the weight format (int8, int4), the dtype the activations are cast to, and the backend:
- native (`lamina.llm.kernels.native`): llama.cpp-style blocks of 32 weights with an fp16 scale, int4 with
  an offset (like Q4_1) or int8 (like Q8_0), integer dot products on int8-quantised activations; the only
  backend the fused decode step (`native_decode`) reads;
- torch: PyTorch's own CPU kernels, `torch._weight_int8pack_mm` (int8 per output channel) and
  `torch._weight_int4pack_mm_for_cpu` (int4 in groups of 32, tinygemm layout).
Which kernel serves a model is measured, not assumed: that is `quant.choose_kernel`'s job, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import InvalidRequestError
from lamina.llm.kernels import native
from lamina.llm.kernels.native import DEFAULT_OPTIONS, NativeOptions

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

    linear_like = True
    """LoRA adapters may wrap it (`lamina.arch.lora`): it maps in_features to out_features as nn.Linear does."""

    gemm_rows: int = 1 << 30
    """Native kernels: inputs of at least this many rows expand the weight to floats and use the float GEMM."""

    def __init__(
        self, linear: nn.Linear, kernel: Kernel, cache_dir: Path | None = None, blocks: torch.Tensor | None = None,
        options: NativeOptions = DEFAULT_OPTIONS,
    ) -> None:
        """`blocks`: the weight already in the native format (a GGUF's Q4_1/Q8_0 bytes), used as they are."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.activation, self.backend = kernel.mode, kernel.activation, kernel.backend
        act = kernel.activation
        self.lib = native.library(cache_dir, options) if kernel.backend == "native" else None
        if self.backend == "native":
            if self.lib is None:
                raise InvalidRequestError(f"native kernels unavailable: {native.unavailable_reason(options)}", param="quantize")
            self.fmt = native.Q4 if kernel.mode == "int4" else native.Q8
            pack = native.pack_q4 if kernel.mode == "int4" else native.pack_q8
            rows = blocks if blocks is not None else pack(linear.weight)
            self.register_buffer("blocks", native.tile_blocks(rows, self.fmt, self.in_features))  # the kernels' tiles
        elif kernel.mode == "int8":
            q, scale = quantize_int8(linear.weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale.to(act))
        else:
            packed, scales_zeros = quantize_int4(linear.weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", scales_zeros.to(act))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def row_blocks(self) -> torch.Tensor:
        """Native backend: the weight as plain row-major blocks (N, K/32 * bytes), as a GGUF stores them."""
        return native.untile_blocks(self.blocks, self.fmt, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if self.lib is not None and x.numel() >= self.gemm_rows * self.in_features:  # a prompt: compute-bound, the float GEMM wins
            gemm = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            # (a scratch weight only where autograd keeps nothing: a backward pass would read the next layer's)
            w = native.dequantize(self.lib, self.fmt, self.blocks, self.out_features, self.in_features, gemm,
                                  scratch=not torch.is_grad_enabled())
            y = F.linear(x.reshape(-1, self.in_features).to(gemm), w)
            return self._finish(y, shape, dtype)
        flat = x.reshape(-1, self.in_features).to(self.activation)
        if self.lib is not None:
            y = native.matmul(self.lib, self.fmt, self.blocks, self.out_features, self.in_features, flat.contiguous())
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, GROUP, self.scales)
        return self._finish(y, shape, dtype)

    def _finish(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        y = y.to(dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)


def replace_linears(
    model: nn.Module, kernel: Kernel, head_kernel: Kernel, cache_dir: Path | None, rows: int = 1 << 30,
    stored: dict[str, tuple[int, torch.Tensor]] | None = None, options: NativeOptions = DEFAULT_OPTIONS,
) -> tuple[int, int]:
    """Swap every Linear (whose inputs divide into groups of 32) for a QuantLinear, `lm_head` on `head_kernel`.

    `rows`: each layer's `gemm_rows`. `stored`: native blocks by weight name, used where format and shape
    match. Returns (layers replaced, of which built from `stored` blocks).
    """
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
            layer = QuantLinear(child, chosen, cache_dir, blocks=blocks, options=options)
            layer.gemm_rows = rows
            setattr(module, child_name, layer)
            replaced += 1
            reused += blocks is not None
    return replaced, reused

"""Training throughput: Lamina's training loop against a plain-PyTorch reference step, same config, same run.

Question: does Lamina's loop (its GPT-2 model, AdamW with decay groups, cosine schedule, clipping, batch
sampler, metrics, progress) add anything over the leanest possible step?

The reference is nanoGPT's model and step written out in this file: 6 layers, 6 heads, 384 wide, context
256, vocabulary 65, batch 12, no biases, tied embeddings, dropout 0, fp32, AdamW(0.9, 0.95, wd 0.1),
clip 1.0; forward, cross-entropy, backward, clip, step. Both train on the same random tokens with the
same threads; rounds alternate the two; the figure is the median tokens/s over timed steps after warm-up.
MFU uses nanoGPT's FLOPs per token (6·N + 12·L·C·T, N without position embeddings) over the fp32 matmul
peak measured here (a 1024³ matmul).

    python bench/train.py [--rounds 3] [--steps 30] [--threads 2]

Prints a table and writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LAYERS, HEADS, WIDTH, CONTEXT, VOCAB, BATCH = 6, 6, 384, 256, 65, 12


# --- the reference: nanoGPT's model and training step ---------------------------------------------------


class RefAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.c_proj = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(WIDTH, bias=False), RefAttention()
        self.ln_2 = nn.LayerNorm(WIDTH, bias=False)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.h = nn.ModuleList(RefBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def reference_run(data: np.ndarray, steps: int, warmup: int, flush_denormal: bool) -> float:
    torch.set_flush_denormal(flush_denormal)
    torch.manual_seed(0)
    model = RefGPT()
    for name, p in model.named_parameters():  # nanoGPT's initialisation
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()  # the whole iteration, batch included, as in Lamina's measurement
        starts = rng.integers(0, len(data) - CONTEXT - 1, BATCH)
        chunk = torch.from_numpy(np.stack([data[s : s + CONTEXT + 1] for s in starts]).astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, VOCAB), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return BATCH * CONTEXT / statistics.median(times)


# --- Lamina: the real Trainer on the same data ------------------------------------------------------------


def lamina_run(data: np.ndarray, steps: int, warmup: int, home: Path, cache: Path) -> tuple[float, float]:
    from lamina.foundation.shards import Shards
    from lamina.foundation.train import StepStats, Trainer
    from lamina.foundation.train_config import RunConfig

    config = RunConfig.from_dict({
        "name": "bench",
        "model": {"family": "gpt2", "n_layers": LAYERS, "n_heads": HEADS, "dim": WIDTH, "bias": False, "activation": "gelu"},
        "train": {"max_steps": warmup + steps, "micro_batch_size": BATCH, "block_size": CONTEXT, "lr": 6e-4, "min_lr": 6e-5,
                  "warmup_steps": 1, "eval_interval": 10**9, "eval_iters": 1, "save_interval": 10**9, "log_interval": 1,
                  "dtype": "float32"},
    })
    meta = {"vocab_size": VOCAB, "dtype": "uint16"}
    shards = Shards(home, data, data[: CONTEXT * 4], meta)
    rates: list[float] = []
    mfus: list[float] = []

    def record(stats: StepStats) -> None:
        if stats.step > warmup:
            rates.append(stats.tokens_per_s)
            mfus.append(stats.mfu)

    # The same cache as main(): the Trainer's MFU uses the very peak measured there.
    Trainer(config, shards, tokenizer=None, run_dir=home / "run", cache_dir=cache, on_step=record).run()  # type: ignore[arg-type]
    return statistics.median(rates), statistics.median(mfus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lamina.infra.device import matmul_peak_gflops

    home = Path(tempfile.mkdtemp(prefix="lamina-bench-train-"))
    peak = matmul_peak_gflops(torch.device("cpu"), torch.float32, home)
    data = np.random.default_rng(0).integers(0, VOCAB, 200_000).astype(np.uint16)
    n_params = sum(p.numel() for p in {id(p): p for p in RefGPT().parameters()}.values()) - CONTEXT * WIDTH
    fpt = 6 * n_params + 12 * LAYERS * WIDTH * CONTEXT
    ref, ref_ftz, lam, lam_mfu = [], [], [], []
    for r in range(args.rounds):
        ref.append(reference_run(data, args.steps, args.warmup, flush_denormal=False))
        ref_ftz.append(reference_run(data, args.steps, args.warmup, flush_denormal=True))
        rate, mfu = lamina_run(data, args.steps, args.warmup, home / f"round{r}", home)
        lam.append(rate)
        lam_mfu.append(mfu)
        print(f"round {r + 1}: reference {ref[-1]:7.0f}  reference+FTZ {ref_ftz[-1]:7.0f}  lamina {lam[-1]:7.0f} tok/s", flush=True)
    ref_tps, ftz_tps, lam_tps = statistics.median(ref), statistics.median(ref_ftz), statistics.median(lam)
    ref_mfu = fpt * ref_tps / (peak * 1e9)
    print(f"\nGPT {LAYERS}L/{HEADS}H/{WIDTH}, context {CONTEXT}, batch {BATCH}, fp32, {args.threads} threads; "
          f"{n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; measured fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'loop':14} {'tokens/s':>9} {'MFU':>6}  runs")
    print(f"{'reference':14} {ref_tps:9.0f} {ref_mfu:6.1%}  {' '.join(f'{x:.0f}' for x in ref)}")
    print(f"{'reference+FTZ':14} {ftz_tps:9.0f} {fpt * ftz_tps / (peak * 1e9):6.1%}  {' '.join(f'{x:.0f}' for x in ref_ftz)}")
    print(f"{'lamina':14} {lam_tps:9.0f} {statistics.median(lam_mfu):6.1%}  {' '.join(f'{x:.0f}' for x in lam)}")
    print(f"lamina / reference: {lam_tps / ref_tps:.3f}x; lamina / reference with denormals flushed: {lam_tps / ftz_tps:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"layers": LAYERS, "heads": HEADS, "width": WIDTH, "context": CONTEXT, "vocab": VOCAB, "batch": BATCH},
        "threads": args.threads, "peak_gflops": peak, "params": n_params, "flops_per_token": fpt,
        "reference_tokens_per_s": ref, "reference_ftz_tokens_per_s": ref_ftz, "lamina_tokens_per_s": lam, "lamina_mfu": lam_mfu,
        "ratio": lam_tps / ref_tps, "ratio_vs_ftz_reference": lam_tps / ftz_tps, "reference_mfu": ref_mfu, "lamina_mfu_median": statistics.median(lam_mfu),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Mixture of experts against dense: same data, same steps, same active parameters per token.

Question: at equal compute per token, does routing each token through 2 of 4 experts (each half the dense
MLP's width) learn better than one dense MLP? Both are Llama-family models trained from scratch on the
pydoc dataset with identical settings and seed; the MoE's load-balancing loss is added to its objective.
Reported: hold-out validation loss, tokens/s, parameters in total and active per token.

    python bench/moe.py [--steps 600] [--dtype float32]

Prints a table and writes bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DIM, LAYERS, HEADS, DENSE_HIDDEN = 192, 4, 4, 768
MOE = {"n_experts": 4, "top_k": 2, "expert_hidden_dim": DENSE_HIDDEN // 2}


def run(kind: str, steps: int, dtype: str, home: Path) -> dict:
    from lamina.foundation.pretrain import pretrain
    from lamina.foundation.train_config import RunConfig

    model = {"family": "llama", "dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": DENSE_HIDDEN, "tie_embeddings": True}
    if kind == "moe":
        model["moe"] = MOE
    config = RunConfig.from_dict({
        "name": f"bench-{kind}",
        "data": {"dataset": "pydoc", "val_fraction": 0.15, "seed": 1337},
        "tokenizer": {"vocab_size": 1024},
        "model": model,
        "train": {"max_steps": steps, "micro_batch_size": 16, "block_size": 128, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": max(1, steps // 20), "eval_interval": max(1, steps // 4), "eval_iters": 20,
                  "save_interval": 10**9, "log_interval": 10, "dtype": dtype, "seed": 7},
    })
    from lamina.arch import build_model

    net = build_model(config.model_config(1024))
    start = time.perf_counter()
    result = pretrain(config, home, register=False)
    return {"kind": kind, "val_loss": result.val_loss, "train_loss": result.train_loss, "seconds": time.perf_counter() - start,
            "tokens_per_s": result.tokens_per_s, "params": net.num_params(), "active_params": net.num_active_params()}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="lamina-bench-moe-"))
    rows = [run(kind, args.steps, args.dtype, home) for kind in ("dense", "moe")]
    print(f"\nLlama {LAYERS}L/{DIM}, pydoc, {args.steps} steps x 16 x 128 tokens, {args.dtype}; MoE {MOE}")
    print(f"{'model':6} {'params':>8} {'active':>8} {'val loss':>9} {'train loss':>10} {'tok/s':>8} {'time s':>7}")
    for r in rows:
        print(f"{r['kind']:6} {r['params'] / 1e6:7.2f}M {r['active_params'] / 1e6:7.2f}M {r['val_loss']:9.3f} "
              f"{r['train_loss']:10.3f} {r['tokens_per_s']:8.0f} {r['seconds']:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "dtype": args.dtype, "moe": MOE, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

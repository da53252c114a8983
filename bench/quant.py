"""Weight-only quantisation: perplexity and batch-1 decode speed of SmolLM2-135M-Instruct per precision.

Question: what do `--quantize int8` and `--quantize int4` cost in quality and buy in speed, against the
float model in the same run? The issue's bar: perplexity within 1 % (int8) and 5 % (int4) of fp32.

Held-out text: Python's own reference documentation (`pydoc_data.topics`, ships with Python), scored two ways,
perplexity = exp(mean next-token cross-entropy):
- prompt path: non-overlapping 512-token windows through the full forward (what prefill computes);
- decode path: the first `--decode-tokens` tokens fed one at a time through the step generation uses (the
  fused native step under --quantize where it applies), so int8-quantised activations are scored too.
Decode speed: 128 greedy tokens after a chat prompt, (n - 1) / (t_n - t_1), median of 3. Each precision runs
in its own process (peak RSS is its own).

    python bench/quant.py [--tokens 8192] [--threads 2]

Prints a table and writes bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
CONFIGS = [("float32", None), ("auto", None), ("auto", "int8"), ("auto", "int4"), ("float32", "int8"), ("float32", "int4")]


def worker(dtype: str, quantize: str | None, tokens: int, threads: int, decode_tokens: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from lamina import LLM
    from lamina.foundation.corpora import pydoc_topics
    from lamina.llm import SamplingParams

    llm = LLM.load("smollm2-135m-instruct", device="cpu", dtype=dtype, quantize=quantize)
    topics = pydoc_topics()
    # every 4th topic, in a fixed order: a spread of the documentation, not one chapter
    text = "\n\n".join(topics[k] for k in sorted(topics)[::4])
    ids = llm.tokenizer.encode(text)[: tokens + 1]
    window = 512
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]])
            y = torch.tensor(chunk[1:])
            logits = llm.model(x).float()[0]
            nll += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(chunk) - 1
    decode_ppl = llm.decode_perplexity(ids[: decode_tokens + 1])
    chat_ids = llm.encode_chat(CHAT)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    speeds = []
    for _ in range(3):
        llm.engine.reset()
        stamps = [time.perf_counter() for _ in llm.generate_ids(chat_ids, params)]
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "precision": quantize or str(llm.dtype).removeprefix("torch."),
        "activations": str(llm.dtype).removeprefix("torch."),
        "perplexity": math.exp(nll / count),
        "tokens_scored": count,
        "decode_perplexity": decode_ppl,
        "decode_tokens_scored": min(decode_tokens, len(ids) - 1) - 1,
        "decode_step": "native" if llm.engine.native_step else "pytorch",
        "decode_tok_s": statistics.median(speeds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--decode-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant.json")
    parser.add_argument("--worker", nargs=2, metavar=("DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dtype, quantize = args.worker
        print(json.dumps(worker(dtype, None if quantize == "none" else quantize, args.tokens, args.threads, args.decode_tokens)))
        return
    rows = []
    for dtype, quantize in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", dtype, quantize or "none", "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{dtype} {quantize}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['precision']:9} ppl {row['perplexity']:.3f}  decode {row['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    base = next(r for r in rows if r["precision"] == "float32")
    print(f"\nSmolLM2-135M-Instruct, {base['tokens_scored']} held-out tokens (pydoc), {args.threads} threads")
    print(f"{'weights':9} {'activations':11} {'step':7} {'ppl prompt':>10} {'vs fp32':>8} {'ppl decode':>10} {'vs fp32':>8} "
          f"{'decode tok/s':>12} {'vs fp32':>8} {'RSS MB':>7}")
    for r in rows:
        r["ppl_vs_fp32"] = r["perplexity"] / base["perplexity"] - 1
        r["decode_ppl_vs_fp32"] = r["decode_perplexity"] / base["decode_perplexity"] - 1
        r["decode_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
        print(f"{r['precision']:9} {r['activations']:11} {r['decode_step']:7} {r['perplexity']:10.3f} {r['ppl_vs_fp32']:+8.2%} "
              f"{r['decode_perplexity']:10.3f} {r['decode_ppl_vs_fp32']:+8.2%} "
              f"{r['decode_tok_s']:12.1f} {r['decode_vs_fp32']:7.2f}x {r['peak_rss_mb']:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Prefix caching: time to first token with and without a cached 500-token system prompt.

Question: when requests share a long system prompt (a RAG preamble, an agent's instructions), how much of
the first-token latency does reusing its keys/values save? The issue's bar: the second request's TTFT is at
most 20 % of the first's.

Each round writes a fresh ~500-token system prompt (so the first request finds nothing cached), sends one
chat request with it, then a second with the same system prompt and another question. TTFT is measured
from `add_request` to the first token event of the engine, in process, one request at a time; the figure
is the median over rounds.

    python bench/prefix.py [--rounds 5] [--quantize int4]

Prints a table and writes bench/results/prefix.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

WORDS = [
    "river",
    "stone",
    "lantern",
    "orchard",
    "copper",
    "meadow",
    "harbor",
    "falcon",
    "willow",
    "ember",
    "glacier",
    "thistle",
    "canyon",
    "marble",
    "sparrow",
    "cedar",
    "quarry",
    "beacon",
    "tundra",
    "saffron",
]


def system_prompt(llm, round_: int, tokens: int = 500) -> str:  # type: ignore[no-untyped-def]
    rules, i = [], 0
    while True:
        w = WORDS[(i * 7 + round_) % len(WORDS)]
        rules.append(
            f"Rule {i + 1} (set {round_}): when the user mentions the {w}, answer with care about the {w}."
        )
        text = "You are a careful assistant. " + " ".join(rules)
        if len(llm.tokenizer.encode(text)) >= tokens:
            return text
        i += 1


def ttft(llm, messages: list[dict]) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    from lamina.llm import SamplingParams

    ids = llm.encode_chat(messages)
    params = SamplingParams(max_tokens=1, temperature=0)
    start = time.perf_counter()
    for event in llm.generate_ids(ids, params):
        return time.perf_counter() - start, len(ids), event.cached_prompt_tokens
    raise RuntimeError("no token")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lamina import LLM

    llm = LLM.load("smollm2-135m-instruct", quantize=None if args.quantize == "none" else args.quantize)
    ttft(llm, [{"role": "user", "content": "warm up"}])
    rows = []
    for r in range(args.rounds):
        system = system_prompt(llm, r)
        first = ttft(
            llm, [{"role": "system", "content": system}, {"role": "user", "content": "What is a lantern?"}]
        )
        second = ttft(
            llm, [{"role": "system", "content": system}, {"role": "user", "content": "Name a bird."}]
        )
        rows.append(
            {
                "prompt_tokens": first[1],
                "first_ttft_ms": first[0] * 1e3,
                "first_cached": first[2],
                "second_ttft_ms": second[0] * 1e3,
                "second_cached": second[2],
                "ratio": second[0] / first[0],
            }
        )
        print(
            f"round {r + 1}: prompt {first[1]} tokens; first TTFT {first[0] * 1e3:.0f} ms ({first[2]} cached), "
            f"second {second[0] * 1e3:.0f} ms ({second[2]} cached): {second[0] / first[0]:.1%}"
        )
    ratio = statistics.median(r["ratio"] for r in rows)
    print(
        f"\nmedian second/first TTFT with a ~500-token shared system prompt ({llm.dtype}, quantize "
        f"{args.quantize}): {ratio:.1%} (first {statistics.median(r['first_ttft_ms'] for r in rows):.0f} ms, "
        f"second {statistics.median(r['second_ttft_ms'] for r in rows):.0f} ms)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"rows": rows, "median_ratio": ratio, "quantize": args.quantize, "dtype": str(llm.dtype)},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

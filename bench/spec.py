"""Speculative decoding by prompt lookup: how much faster greedy generation gets on tasks that copy from
their context, with output identical to plain decoding.

Question: on a RAG answer (quote the passage that answers), a summary and a code edit (rename a variable in a
function), how many tokens per second does greedy decoding reach with `speculative_tokens` = 0 (plain), 3 and
5, how many drafted tokens are accepted, and are the tokens the same? Lamina's default precision (the GGUF's
own Q4_1 blocks), 2 threads, in-process (`LLM.generate_ids`), one request at a time. Decode speed is
(tokens - 1) / (last token - first token) (the prefill excluded), the median of `--rounds` runs; each setting
alternates with the others within a round.

    python bench/spec.py [--rounds 3] [--max-tokens 160]

Prints a table and writes bench/results/spec.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PASSAGE = (
    "The Lamina lighthouse stands on a granite point at the mouth of the Sable River. It was built in 1871 by the "
    "harbour board after the schooner Marguerite ran aground in a November gale, and its first keeper, Ada Grieve, "
    "kept the lamp for thirty-one years. The tower is 28 metres tall and its light, a second-order Fresnel lens, can be "
    "seen 22 nautical miles out to sea. In 1932 the oil lamp was replaced by an electric one, and in 1987 the station "
    "was automated; the keeper's cottage is now a small museum that opens from May to September. Every year on the "
    "first Sunday of August the town holds a lantern walk from the harbour to the lighthouse in Ada Grieve's memory."
)
CODE = '''def summarize(orders):
    total = 0
    count = 0
    biggest = None
    for order in orders:
        if order.cancelled:
            continue
        total += order.amount
        count += 1
        if biggest is None or order.amount > biggest.amount:
            biggest = order
    average = total / count if count else 0.0
    return {"total": total, "count": count, "average": average, "biggest": biggest}
'''
TASKS = {
    "rag-answer": f"Context:\n{PASSAGE}\n\nUsing only the context, answer the question and quote the sentences you used: "
                  "When was the lighthouse built, and who was its first keeper?",
    "summary": f"{PASSAGE}\n\nSummarize the text above in three sentences, keeping its facts and wording.",
    "code-edit": f"{CODE}\nRewrite this Python function with the variable `total` renamed to `running_sum`. "
                 "Output the whole function and nothing else.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 3, 5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "spec.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lamina import LLM
    from lamina.infra.device import cpu_features
    from lamina.llm import SamplingParams

    llm = LLM.load("smollm2-135m-instruct")
    precision = "int4" if any(type(m).__name__ == "QuantLinear" for m in llm.model.modules()) else str(llm.dtype)

    def counts() -> tuple[int, int]:
        return llm.engine.call(lambda e: (e.drafted, e.accepted))

    rows = []
    for task, text in TASKS.items():
        ids = llm.encode_chat([{"role": "user", "content": text}])
        speeds: dict[int, list[float]] = {k: [] for k in args.settings}
        outputs: dict[int, list[int]] = {}
        drafted: dict[int, int] = dict.fromkeys(args.settings, 0)
        accepted: dict[int, int] = dict.fromkeys(args.settings, 0)
        for _ in range(args.rounds):
            for k in args.settings:
                llm.engine.reset()
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0, speculative_tokens=k)
                before = counts()
                stamps, tokens = [], []
                for token in llm.generate_ids(ids, params):
                    stamps.append(time.perf_counter())
                    tokens.append(token.token_id)
                after = counts()
                drafted[k] += after[0] - before[0]
                accepted[k] += after[1] - before[1]
                speeds[k].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                if outputs.setdefault(k, tokens) != tokens:
                    raise SystemExit(f"{task}: speculative_tokens={k} gave different tokens from one round to the next")
        plain = outputs[args.settings[0]]
        row = {"task": task, "prompt_tokens": len(ids), "new_tokens": len(plain), "settings": {}}
        for k in args.settings:
            row["settings"][k] = {
                "decode_tok_s": statistics.median(speeds[k]), "runs": speeds[k], "identical": outputs[k] == plain,
                "drafted": drafted[k], "accepted": accepted[k], "acceptance": accepted[k] / drafted[k] if drafted[k] else None,
                "speedup": statistics.median(speeds[k]) / statistics.median(speeds[args.settings[0]]),
            }
        rows.append(row)
        shown = "  ".join(f"k={k}: {v['decode_tok_s']:.1f} tok/s x{v['speedup']:.2f} (accepted {v['accepted']}/{v['drafted']}"
                          f"{'' if v['identical'] else ', DIFFERENT'})" for k, v in row["settings"].items())
        print(f"{task:11} {len(ids):4d} prompt, {len(plain):3d} new: {shown}", flush=True)
        if not all(v["identical"] for v in row["settings"].values()):
            raise SystemExit(f"{task}: speculative decoding changed the greedy output")
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "?")
    args.out.write_text(json.dumps({"machine": {"cpu": name, "features": cpu_features(), "threads": args.threads},
                                    "precision": precision, "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

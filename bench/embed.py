"""Sentence-embedding throughput of all-MiniLM-L6-v2: Lamina's Embedder against sentence-transformers.

Question: how many sentences per second does Lamina embed, relative to sentence-transformers on the same
model folder, the same threads, in the same run?

The workload is 1,000 synthetic English-like sentences of 10-60 words (fixed seed, built from the word
list below, nothing downloaded), embedded in batches of 32 from a Python list to float32 unit vectors,
tokenization included. Both engines are light, so both run in this one process; after a warm-up pass each,
they alternate within every round (the order flips each round so neither always runs on a warmer cache),
and each figure is the median over rounds. Before timing, the vectors are checked to agree (cosine).
Both engines also run in the dtype Lamina's `auto` picks on this machine (measured by a GEMM probe), when
that is not float32; the headline ratio is float32 against float32.

    python bench/embed.py [--rounds 5] [--threads 2] [--sentences 1000] [--batch-size 32]

Prints a table and writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the model hub: the model folder is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORD_LIST = """
the a an of to in and for on with at by from about into over after under between through during without
model data system network energy river city market policy science student teacher history music garden
engine storm harbour village mountain forest doctor patient library museum kitchen window letter journey
language computer signal protein planet ocean winter summer morning evening company government research
quickly slowly carefully quietly often never always sometimes perhaps clearly nearly rarely suddenly
build measure describe explain protect improve reduce increase discover carry follow answer remember
green ancient modern simple complex bright heavy gentle narrow silent famous public private local global
is was will can could should might must has had does did makes made takes took gives gave shows showed
12 48 2024 3.5 1,000 100% x86 GPU API JSON café naïve résumé Zürich
"""
WORDS = WORD_LIST.split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences of 10-60 words drawn from WORDS, capitalised and punctuated like prose."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 60))]
        if rng.random() < 0.3:
            words.insert(rng.randint(1, len(words) - 1), ",")
        sentences.append(" ".join(words).replace(" ,", ",").capitalize() + rng.choice(".?!"))
    return sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embed.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from lamina import Embedder
    from lamina.infra.device import resolve_dtype
    from lamina.settings import get_settings

    texts = make_sentences(args.sentences)
    auto = str(resolve_dtype("auto", torch.device("cpu"), get_settings().home / "cache")).removeprefix("torch.")
    dtypes = ["float32"] + ([auto] if auto != "float32" else [])
    engines: dict[tuple[str, str], Callable[[], np.ndarray]] = {}
    load_s: dict[tuple[str, str], float] = {}
    for dtype in dtypes:
        t0 = time.perf_counter()
        lamina = Embedder.load("all-minilm-l6-v2", device="cpu", dtype=dtype)
        load_s[("lamina", dtype)] = time.perf_counter() - t0
        assert lamina.entry is not None
        t0 = time.perf_counter()
        st = SentenceTransformer(str(lamina.entry.path), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
        load_s[("sentence-transformers", dtype)] = time.perf_counter() - t0
        engines[("lamina", dtype)] = partial(lamina.embed, texts, batch_size=args.batch_size)
        engines[("sentence-transformers", dtype)] = partial(
            st.encode, texts, batch_size=args.batch_size, convert_to_numpy=True
        )
        if dtype == "float32":
            tokens = sum(lamina.embed_with_info(texts).token_counts)

    # Warm-up, and the agreement check: every engine against sentence-transformers in float32.
    vectors = {key: fn() for key, fn in engines.items()}
    ref = vectors[("sentence-transformers", "float32")]
    min_cosine = {f"{e} {d}": float((v * ref).sum(axis=1).min()) for (e, d), v in vectors.items()}

    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for key in order:
            t = time.perf_counter()
            engines[key]()
            seconds[key].append(time.perf_counter() - t)
            print(f"round {r + 1}: {key[0]:22} {key[1]:9} {args.sentences / seconds[key][-1]:7.1f} sentences/s",
                  file=sys.stderr)

    rows = []
    for (engine, dtype), times in seconds.items():
        runs = [args.sentences / s for s in times]
        median = statistics.median(runs)
        rows.append({
            "engine": engine, "dtype": dtype, "sentences_per_s": median, "sentences_per_s_runs": runs,
            "tokens_per_s": median * tokens / args.sentences, "load_s": load_s[(engine, dtype)],
            "min_cosine_vs_st_float32": min_cosine[f"{engine} {dtype}"],
        })
    by = {(r["engine"], r["dtype"]): r["sentences_per_s"] for r in rows}
    ratios = {f"lamina {d} / sentence-transformers {d}": by[("lamina", d)] / by[("sentence-transformers", d)]
              for d in dtypes}
    if auto != "float32":
        ratios[f"lamina auto ({auto}) / sentence-transformers float32"] = (
            by[("lamina", auto)] / by[("sentence-transformers", "float32")]
        )
    spread = max((max(r["sentences_per_s_runs"]) - min(r["sentences_per_s_runs"])) / r["sentences_per_s"] for r in rows)

    print(f"\nall-MiniLM-L6-v2 on CPU, {args.sentences} sentences ({tokens} tokens, mean "
          f"{tokens / args.sentences:.1f}/sentence), batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.rounds} rounds; auto dtype here = {auto}")
    print(f"{'engine':22} {'dtype':9} {'sentences/s':>12} {'tokens/s':>9} {'min cos':>10} {'load s':>7}   runs")
    for r in rows:
        runs = " ".join(f"{x:.0f}" for x in r["sentences_per_s_runs"])
        print(f"{r['engine']:22} {r['dtype']:9} {r['sentences_per_s']:12.1f} {r['tokens_per_s']:9.0f} "
              f"{r['min_cosine_vs_st_float32']:10.7f} {r['load_s']:7.2f}   {runs}")
    print(f"largest spread across rounds: {spread:.0%} (min cos: lowest cosine against sentence-transformers float32)")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": _cpu(), "threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__},
        "auto_dtype": auto, "sentences": args.sentences, "tokens": tokens, "batch_size": args.batch_size,
        "rounds": args.rounds, "rows": rows, "ratios": ratios, "spread": spread,
    }, indent=2))
    print(f"wrote {args.out}")


def _cpu() -> str:
    from lamina.infra.device import cpu_features, cpu_model

    return f"{cpu_model()} ({' '.join(cpu_features())})"


if __name__ == "__main__":
    main()

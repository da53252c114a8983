"""Batch-1 prefill and decode speed of SmolLM2-135M-Instruct: Lamina against transformers and llama.cpp.

Question: how fast does Lamina's own model code generate, relative to transformers on the same GGUF
weights and to llama.cpp on the same GGUF file (Q4_1), the same threads, in the same run? Lamina runs as it
loads with no arguments (the default precision; for this GGUF int4 on its own Q4_1 blocks), in float32 and in
the float dtype `auto` picks (quantisation off), and with `--quantize int8` / `int4`.
llama.cpp is measured through its own `llama-server` (built by `python bench/peers.py`, one slot, prompt
cache off), from the `timings` it reports per request: `predicted_per_second` (decode) and
`prompt_per_second` (prefill).

The memory limit of each precision: the bytes of weights one token reads in it (every linear layer and the
output head, as stored: floats or blocks), over how fast this machine reads a 1 GiB buffer, measured in its
own process (with, for reference, how fast batch-1 `F.linear` streams the fp32 weights).

Each (engine, dtype) runs in its own process, so peak RSS is that engine's own; engines alternate within
each round, and each figure is the median over rounds. Decode speed is (n - 1) / (t_n - t_1) over n greedy
tokens with end-of-sequence ignored (the prefill is excluded); prefill is one forward over a 512-token
prompt with logits for the last position only.

    python bench/decode.py [--rounds 3] [--threads 2] [--new-tokens 128]

Prints a table and writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
PREFILL_TEXT = (
    "Lamina implements the six layers of a generative-AI system as one coherent, fast, installable stack: "
    "infrastructure, architecture, foundation models, LLM, API and applications. "
)


def bandwidth(threads: int) -> dict:
    """The memory-bandwidth limit of fp32 decoding here: bytes of weights one token reads, and how fast this
    machine reads memory (a 1 GiB sum) and streams those weights through batch-1 `F.linear`."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from lamina import LLM

    config = LLM.load("smollm2-135m-instruct", device="cpu", dtype="float32").config
    c = config
    shapes = [(c.n_heads * c.head_dim, c.dim), (c.n_kv_heads * c.head_dim, c.dim), (c.n_kv_heads * c.head_dim, c.dim),
              (c.dim, c.n_heads * c.head_dim), (c.hidden_dim, c.dim), (c.hidden_dim, c.dim), (c.dim, c.hidden_dim)]
    weights = [torch.randn(o, i) for _ in range(c.n_layers) for o, i in shapes] + [torch.randn(c.vocab_size, c.dim)]
    token_bytes = sum(w.numel() * 4 for w in weights)
    buf = torch.ones(256 * 1024**2)  # 1 GiB of float32

    def best(fn, n: int = 5) -> float:  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    read = buf.numel() * 4 / best(lambda: buf.sum())
    with torch.inference_mode():
        xs = {i: torch.randn(1, i) for _, i in shapes}
        linear = token_bytes / best(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
    return {"token_bytes": token_bytes, "read_gb_s": read / 1e9, "linear_gb_s": linear / 1e9,
            "limit_tok_s": read / token_bytes, "linear_limit_tok_s": linear / token_bytes}


def worker(engine: str, dtype: str, threads: int, new_tokens: int) -> dict:
    import resource

    import torch

    if engine == "bandwidth":
        return bandwidth(threads)
    torch.set_num_threads(threads)
    from lamina import LLM
    from lamina.llm import SamplingParams

    t0 = time.perf_counter()
    # Lamina's tokenizer and template are checked equal to transformers' by the test suite; use them for all.
    if engine == "llama.cpp":  # (only Lamina's tokenizer is used then)
        lamina = LLM.load("smollm2-135m-instruct", device="cpu", dtype="float32", quantize="none")
    elif dtype == "default":  # what `LLM.load` and `lamina serve` do with no arguments
        lamina = LLM.load("smollm2-135m-instruct", device="cpu")
    elif dtype in ("int8", "int4"):
        lamina = LLM.load("smollm2-135m-instruct", device="cpu", quantize=dtype)
    else:  # floats, quantisation off
        lamina = LLM.load("smollm2-135m-instruct", device="cpu", dtype=dtype, quantize="none")
    from lamina.llm.kernels.linear import QuantLinear

    modes = {m.mode for m in lamina.model.modules() if isinstance(m, QuantLinear)}
    resolved = "+".join(sorted(modes)) if modes else str(lamina.dtype).removeprefix("torch.")
    weight_bytes = _weight_bytes(lamina.model)
    chat_ids = lamina.encode_chat(CHAT)
    prefill_ids = (lamina.tokenizer.encode(PREFILL_TEXT * 40))[:512]
    if engine == "llama.cpp":
        return _llama_server(lamina.entry.path, lamina.encode_chat(CHAT), prefill_ids, threads, new_tokens) | {
            "engine": engine, "dtype": "Q4_1 GGUF"}
    if engine == "transformers":
        from transformers import AutoModelForCausalLM

        path = lamina.entry.path
        del lamina
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, resolved)
        ).eval()
        load_s = time.perf_counter() - t0
        prefill = _time(lambda: model(torch.tensor([prefill_ids]), logits_to_keep=1))
        decode = _hf_decode(model, chat_ids, new_tokens)
    else:
        load_s = time.perf_counter() - t0
        model = lamina.model

        def run_prefill() -> None:
            with torch.inference_mode():
                model(torch.tensor([prefill_ids]), last_only=True)

        prefill = _time(run_prefill)
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        decode = []
        for _ in range(3):
            lamina.engine.reset()
            stamps = [time.perf_counter() for _ in lamina.generate_ids(chat_ids, params)]
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        decode = statistics.median(decode)
    return {
        "engine": engine,
        "dtype": resolved,
        "weight_bytes": weight_bytes,
        "load_s": load_s,
        "prefill_tok_s": len(prefill_ids) / prefill,
        "decode_tok_s": decode,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _weight_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Bytes of weights one decode step reads: every linear layer's stored weight (blocks or floats) and the head."""
    import torch
    from torch import nn

    from lamina.llm.kernels.linear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in m.buffers() if t.dtype == torch.uint8)
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def _llama_server(gguf: Path, chat_ids: list[int], prefill_ids: list[int], threads: int, n: int) -> dict:
    import socket

    import httpx
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import llama_server

    binary, note = llama_server()
    if binary is None:
        raise SystemExit(note)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads), "-tb", str(threads),
                             "-np", "1", "-c", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise SystemExit("llama-server did not start")
            time.sleep(0.1)
        load_s = time.perf_counter() - t0

        def run(prompt: list[int], predict: int) -> dict:
            body = {"prompt": prompt, "n_predict": predict, "temperature": 0, "top_k": 1, "ignore_eos": True,
                    "cache_prompt": False}
            return httpx.post(f"{url}/completion", json=body, timeout=600).json()["timings"]

        run(chat_ids, 8)  # warm-up
        decode = statistics.median(run(chat_ids, n)["predicted_per_second"] for _ in range(3))
        prefill = statistics.median(run(prefill_ids, 1)["prompt_per_second"] for _ in range(3))
        rss = psutil.Process(proc.pid).memory_info().rss / 1e6
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_mb": rss}


def _time(fn) -> float:  # type: ignore[no-untyped-def]
    import torch

    with torch.inference_mode():
        fn()  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _hf_decode(model, prompt_ids: list[int], n: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    speeds = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
        for _ in range(3):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            tn = time.perf_counter() - t
            speeds.append((n - 1) / (tn - t1))
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.threads, args.new_tokens)))
        return

    default = _run("lamina", "default", args)["dtype"]  # what no arguments resolve to here (also a warm-up)
    auto = _run("lamina", "auto", args)["dtype"]  # the float dtype `auto` picks here
    configs = [("lamina", "default"), ("lamina", "float32"), ("transformers", "float32")]
    if auto != "float32":
        configs += [("lamina", auto), ("transformers", auto)]
    configs += [("lamina", "int8"), ("lamina", "int4")]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import llama_server

    if llama_server()[0] is not None:
        configs.append(("llama.cpp", "Q4_1 GGUF"))
    else:
        print(f"llama.cpp: {llama_server()[1]} -- compared with transformers alone", file=sys.stderr)
    rounds: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for engine, dtype in configs:
            result = _run(engine, dtype, args)
            rounds[(engine, dtype)].append(result)
            print(f"round {r + 1}: {engine:12} {dtype:9} decode {result['decode_tok_s']:6.1f} tok/s  "
                  f"prefill {result['prefill_tok_s']:6.0f} tok/s", file=sys.stderr)
    rows = []
    for (engine, dtype), results in rounds.items():
        row = {"engine": engine, "dtype": dtype, "resolved": results[0]["dtype"], "weight_bytes": results[0].get("weight_bytes")}
        for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb", "load_s"):
            values = [x[key] for x in results]
            row[key] = statistics.median(values)
            row[key + "_runs"] = values
        rows.append(row)
    by = {(r["engine"], r["dtype"]): r for r in rows}
    hf32 = by[("transformers", "float32")]
    bw = _run("bandwidth", "float32", args)
    ratios = {
        "decode lamina fp32 / transformers fp32": by[("lamina", "float32")]["decode_tok_s"] / hf32["decode_tok_s"],
        "prefill lamina fp32 / transformers fp32": by[("lamina", "float32")]["prefill_tok_s"] / hf32["prefill_tok_s"],
        f"decode lamina auto ({auto}) / transformers fp32": by[("lamina", auto)]["decode_tok_s"] / hf32["decode_tok_s"],
    }
    llama = by.get(("llama.cpp", "Q4_1 GGUF"))
    for q in ("int8", "int4"):
        if llama:
            ratios[f"decode lamina {q} / llama.cpp Q4_1"] = by[("lamina", q)]["decode_tok_s"] / llama["decode_tok_s"]
            ratios[f"prefill lamina {q} / llama.cpp Q4_1"] = by[("lamina", q)]["prefill_tok_s"] / llama["prefill_tok_s"]
    if llama:
        ratios[f"prefill lamina {auto} / llama.cpp Q4_1"] = by[("lamina", auto)]["prefill_tok_s"] / llama["prefill_tok_s"]
    if llama:
        ratios[f"decode lamina default ({default}) / llama.cpp Q4_1"] = by[("lamina", "default")]["decode_tok_s"] / llama["decode_tok_s"]
    if auto != "float32":
        hf_auto = by[("transformers", auto)]
        ratios[f"decode lamina {auto} / transformers {auto}"] = by[("lamina", auto)]["decode_tok_s"] / hf_auto["decode_tok_s"]
        ratios[f"prefill lamina {auto} / transformers {auto}"] = by[("lamina", auto)]["prefill_tok_s"] / hf_auto["prefill_tok_s"]

    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF), batch 1, {args.threads} threads, "
          f"median of {args.rounds} rounds; auto dtype here = {auto}")
    read = bw["read_gb_s"] * 1e9
    print(f"{'engine':13} {'dtype':14} {'decode tok/s':>12} {'weights MB':>10} {'limit tok/s':>11} {'share':>6} "
          f"{'prefill-512 tok/s':>18} {'peak RSS MB':>12} {'load s':>7}")
    for r in rows:
        label = f"default={r['resolved']}" if r["dtype"] == "default" else r["dtype"]
        if r["engine"] == "lamina" and r["weight_bytes"]:
            r["limit_tok_s"] = read / r["weight_bytes"]
            r["share_of_limit"] = r["decode_tok_s"] / r["limit_tok_s"]
            mem = f"{r['weight_bytes'] / 1e6:10.0f} {r['limit_tok_s']:11.1f} {r['share_of_limit']:6.0%}"
        else:
            mem = f"{'':10} {'':11} {'':6}"
        print(f"{r['engine']:13} {label:14} {r['decode_tok_s']:12.1f} {mem} {r['prefill_tok_s']:18.0f} "
              f"{r['peak_rss_mb']:12.0f} {r['load_s']:7.1f}")
    print("(limit: the bytes of weights a token reads, at the measured 1 GiB read speed; share: decode / limit)")
    spread = max(
        (max(r["decode_tok_s_runs"]) - min(r["decode_tok_s_runs"])) / r["decode_tok_s"] for r in rows
    )
    print(f"largest decode spread across rounds: {spread:.0%}")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    fp32 = by[("lamina", "float32")]["decode_tok_s"]
    bw["lamina_fp32_share_of_limit"] = fp32 / bw["limit_tok_s"]
    print(f"memory: a 1 GiB read runs at {bw['read_gb_s']:.1f} GB/s, batch-1 F.linear streams fp32 weights at "
          f"{bw['linear_gb_s']:.1f} GB/s; one fp32 token reads {bw['token_bytes'] / 1e6:.0f} MB of weights, so the "
          f"bandwidth limit is {bw['limit_tok_s']:.1f} tok/s (F.linear's: {bw['linear_limit_tok_s']:.1f}); Lamina fp32 "
          f"decodes at {fp32:.1f} tok/s = {bw['lamina_fp32_share_of_limit']:.0%} of the limit")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": _cpu(), "threads": args.threads, "python": platform.python_version()},
        "auto_dtype": auto, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "rows": rows, "ratios": ratios, "decode_spread": spread, "bandwidth": bw,
    }, indent=2))
    print(f"wrote {args.out}")


def _run(engine: str, dtype: str, args: argparse.Namespace) -> dict:
    if engine == "llama.cpp":
        dtype = "gguf"
    cmd = [sys.executable, __file__, "--worker", engine, dtype, "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{engine} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    from lamina.infra.device import cpu_features, cpu_model

    return f"{cpu_model()} ({' '.join(cpu_features())})"


if __name__ == "__main__":
    main()

"""Long contexts: decode speed and time to first token at 512, 2k, 4k and 8k (8,000: the context is 8,192) prompt tokens, Lamina against
llama.cpp's `llama-server`, same GGUF, same prompts, same run.

Question: as the prompt grows, how fast does each server take it in (TTFT) and how fast does it then decode,
when every step reads the whole KV cache? Both run as their users start them (Lamina: `lamina serve` with no
flags; llama-server: `-np 1 -c 8320`, its default f16 KV cache), 2 threads, one request at a time. Each
request is a streamed `/v1/completions` of 96 greedy tokens (end-of-sequence ignored) over a prompt of exactly
N tokens of varied English (the tokenizer's own ids, given as a list, so both see the same tokens), each
request's prompt different from the last so no prefix cache helps. TTFT is from sending to the first streamed
token; decode tok/s is (tokens - 1) / (last token - first token). The median of `--rounds` requests per
length, servers alternating.

    python bench/longctx.py [--lengths 512 2048 4096 8000] [--rounds 2]

Prints a table and writes bench/results/longctx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import llama_server
from serve import _free_port, _wait_healthy

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 96


def _prompt(tokenizer, n: int, salt: int) -> list[int]:  # type: ignore[no-untyped-def]
    """n token ids of varied text (Python's own documentation), starting at a point that differs per salt."""
    from lamina.foundation.corpora import pydoc_topics

    text = "\n\n".join(pydoc_topics().values())
    ids = tokenizer.encode(text)
    start = (salt * 7919) % max(1, len(ids) - n)
    out = ids[start : start + n]
    while len(out) < n:
        out += ids[: n - len(out)]
    return out


def _start(kind: str, home: Path, ctx: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LAMINA_HOME": str(home), "LAMINA_THREADS": "2", "OMP_NUM_THREADS": "2"}
    if kind == "lamina":
        cmd = [sys.executable, "-m", "lamina", "serve", "--port", str(port)]
    else:
        from lamina.infra.registry import Registry

        binary, note = llama_server()
        if binary is None:
            raise SystemExit(note)
        cmd = [str(binary), "-m", str(Registry(home).resolve(MODEL).path), "--host", "127.0.0.1", "--port", str(port),
               "-t", "2", "-tb", "2", "-np", "1", "-c", str(ctx), "--alias", MODEL]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_healthy(url, proc)
    return proc, url


def _request(url: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False}
    stamps: list[float] = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} tokens streamed")
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "longctx.json")
    args = parser.parse_args()
    from lamina.infra.device import cpu_features
    from lamina.infra.registry import Registry
    from lamina.llm.formats.loader import read_checkpoint

    home = Path(tempfile.mkdtemp(prefix="lamina-longctx-"))
    tokenizer = read_checkpoint(Registry(home).resolve(MODEL)).tokenizer  # the model's own
    ctx = max(args.lengths) + NEW_TOKENS + 32
    servers = {kind: _start(kind, home, ctx) for kind in ("lamina", "llama-server")}
    rows = []
    try:
        for url in (u for _, u in servers.values()):  # warm-up (the first request builds kernels, fills caches)
            _request(url, _prompt(tokenizer, 64, 0))
        salt = 1
        for n in args.lengths:
            runs: dict[str, list[dict]] = {kind: [] for kind in servers}
            for _ in range(args.rounds):
                for kind, (_, url) in servers.items():
                    runs[kind].append(_request(url, _prompt(tokenizer, n, salt)))
                    salt += 1
            row = {"prompt_tokens": n}
            for kind, rs in runs.items():
                row[kind] = {"ttft_s": statistics.median(r["ttft_s"] for r in rs),
                             "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs), "runs": rs}
            row["decode_ratio"] = row["lamina"]["decode_tok_s"] / row["llama-server"]["decode_tok_s"]
            row["ttft_ratio"] = row["lamina"]["ttft_s"] / row["llama-server"]["ttft_s"]
            rows.append(row)
            print(f"{n:6d} tokens: lamina decode {row['lamina']['decode_tok_s']:6.1f} tok/s, TTFT {row['lamina']['ttft_s']:6.2f} s | "
                  f"llama-server {row['llama-server']['decode_tok_s']:6.1f} tok/s, TTFT {row['llama-server']['ttft_s']:6.2f} s | "
                  f"decode x{row['decode_ratio']:.2f}, TTFT x{row['ttft_ratio']:.2f}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    machine = {"cpu": platform.processor() or _cpu_name(), "features": cpu_features(), "threads": 2}
    args.out.write_text(json.dumps({"machine": machine, "new_tokens": NEW_TOKENS, "rows": rows}, indent=2) + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()

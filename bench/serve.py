"""Serving under load: `lamina serve` against llama.cpp's `llama-server`, same GGUF, same requests, same run.

Question: with 1, 4, 16 and 64 concurrent streaming clients, how many tokens per second does each server
deliver in aggregate, how soon does the first token come (TTFT), how steady is the stream (inter-token
latency), and does anything fail?

Each client sends streamed chat completions back to back (48 new tokens, temperature 0.7, `stream_options.
include_usage`, a short system prompt shared by all so both servers' prompt caches can work; every request
asks a different question). Aggregate tokens/s = completion tokens (from the usage chunks) / wall time of
the level. Both servers use 2 threads and the default model (Lamina as `lamina serve` runs it with no flags,
unless `--quantize` says otherwise). `llama-server` runs with `-np` = clients
(one slot each, 2048 context each) and its prompt cache on; it is built by `python bench/peers.py`.

    python bench/serve.py [--levels 1 4 16 64] [--requests-per-client 2] [--only lamina]

Prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import llama_server

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
QUANTIZE = "default"
TOPICS = ["volcanoes", "bread", "rivers", "the moon", "bicycles", "owls", "glass", "tea", "trains", "coral", "maps", "bees",
          "clocks", "snow", "paper", "wind"]


def _question(client: int, i: int) -> str:
    return f"Tell me one interesting fact about {TOPICS[(client + i) % len(TOPICS)]} (question {client}-{i})."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0.7, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not stamps:
        return {"error": "no content"}
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens,
            "end": stamps[-1]}


async def _level(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as http:
        async def run_client(c: int) -> list[dict]:
            return [await _one(http, url, model, _question(c, i), max_tokens) for i in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(run_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99), "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99)}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become healthy")


def _start(kind: str, clients: int, home: Path) -> tuple[subprocess.Popen, str, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LAMINA_HOME": str(home), "LAMINA_THREADS": "2", "OMP_NUM_THREADS": "2"}
    if kind == "lamina":
        cmd = [sys.executable, "-m", "lamina", "serve", "--port", str(port), "--max-running", str(max(clients, 1))]
        if QUANTIZE != "default":
            cmd += ["--quantize", QUANTIZE]
        model = MODEL
    else:
        binary, _ = llama_server()
        from lamina.infra.registry import Registry

        gguf = Registry(home).resolve(MODEL).path
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-np", str(clients),
               "-c", str(2048 * clients), "--alias", MODEL]
        model = MODEL
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_healthy(url, proc)
    return proc, url, model


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 1e6
    except psutil.Error:
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--only", choices=["lamina", "llama-server"], default=None)
    parser.add_argument("--quantize", choices=["default", "none", "int8", "int4"], default="default",
                        help="lamina's weights (int4: the same bits as the Q4_1 GGUF llama-server runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = parser.parse_args()
    global QUANTIZE
    QUANTIZE = args.quantize
    kinds = [k for k in ("lamina", "llama-server") if args.only in (None, k)]
    if "llama-server" in kinds and llama_server()[0] is None:
        print(f"llama-server: {llama_server()[1]} -- measuring lamina alone", file=sys.stderr)
        kinds.remove("llama-server")
    home = Path(tempfile.mkdtemp(prefix="lamina-bench-serve-"))
    rows = []
    for clients in args.levels:
        for kind in kinds:
            proc, url, model = _start(kind, clients, home)
            try:
                asyncio.run(_level(url, model, 1, 1, 8))  # warm-up
                row = asyncio.run(_level(url, model, clients, args.requests_per_client, args.max_tokens))
                row |= {"server": kind, "rss_mb": _rss_mb(proc.pid)}
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            rows.append(row)
            print(f"{kind:12} {clients:3} clients: {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.0f} ms "
                  f"p99 {row['ttft_p99_ms']:7.0f}  ITL p50 {row['itl_p50_ms']:5.0f} p99 {row['itl_p99_ms']:6.0f} ms  "
                  f"errors {row['errors']}  RSS {row['rss_mb']:.0f} MB", flush=True)
    print(f"\n{'server':12} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['server']:12} {r['clients']:7} {r['tok_s']:8.1f} {r['ttft_p50_ms']:9.0f} {r['ttft_p99_ms']:9.0f} "
              f"{r['itl_p50_ms']:8.0f} {r['itl_p99_ms']:8.0f} {r['errors']:6} {r['rss_mb']:7.0f}")
    by = {(r["server"], r["clients"]): r for r in rows}
    for clients in args.levels:
        if ("lamina", clients) in by and ("llama-server", clients) in by:
            ratio = by[("lamina", clients)]["tok_s"] / by[("llama-server", clients)]["tok_s"]
            print(f"aggregate lamina / llama-server at {clients} clients: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "lamina_quantize": args.quantize, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

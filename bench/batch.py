"""The Batch API beside interactive traffic: a 1,000-line batch against the same requests sent interactively.

Question: how fast does a batch go through (requests and completion tokens per second, from create to
completed) against the same requests sent by 16 concurrent streaming clients, and what does a batch cost the
interactive traffic beside it: the time to first token of single interactive requests on an idle server,
against the same requests sent while the batch runs?

One `lamina serve` with no flags but `--batch-concurrency` (the default model and precision), 2 threads.
Requests are chat completions of 32 new tokens at temperature 0, each asking a different question. Order: TTFT
on the idle server (20 requests, one at a time), the interactive run (the N requests, 16 clients), the batch
(the same N lines), with one interactive request every second while it runs.

    python bench/batch.py [--requests 1000] [--batch-concurrency 4]

Prints a summary and writes bench/results/batch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import MODEL, _free_port, _level, _one, _wait_healthy

MAX_TOKENS = 32
TOPICS = ["volcanoes", "bread", "rivers", "the moon", "bicycles", "owls", "glass", "tea", "trains", "coral", "maps", "bees"]


def _question(i: int) -> str:
    return f"Tell me one interesting fact about {TOPICS[i % len(TOPICS)]} (question {i})."


def _line(i: int) -> str:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": _question(i)}]}
    return json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


async def _ttfts(url: str, count: int, gap_s: float, stop: asyncio.Event | None = None) -> list[float]:
    out = []
    async with httpx.AsyncClient() as http:
        for i in range(count):
            if stop is not None and stop.is_set():
                break
            r = await _one(http, url, MODEL, _question(10_000 + i), MAX_TOKENS)
            if "ttft" in r:
                out.append(r["ttft"] * 1000)
            await asyncio.sleep(gap_s)
    return out


async def _batch(url: str, n: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        data = "\n".join(_line(i) for i in range(n)).encode()
        upload = (await http.post("/v1/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})).json()
        start = time.perf_counter()
        batch = (await http.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                                                        "completion_window": "24h"})).json()
        done = asyncio.Event()
        probes = asyncio.create_task(_ttfts(url, 10_000, 1.0, done))
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            await asyncio.sleep(0.5)
            batch = (await http.get(f"/v1/batches/{batch['id']}")).json()
        wall = time.perf_counter() - start
        done.set()
        during = await probes
        out = [json.loads(x) for x in (await http.get(f"/v1/files/{batch['output_file_id']}/content")).text.splitlines()]
    tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    return {"status": batch["status"], "counts": batch["request_counts"], "wall_s": wall, "requests_s": len(out) / wall,
            "tokens": tokens, "tok_s": tokens / wall, "ttft_during_ms": during,
            "custom_ids_once": sorted(o["custom_id"] for o in out) == sorted(f"q{i}" for i in range(n))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "batch.json")
    args = parser.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="lamina-bench-batch-") as home:
        env = {**os.environ, "LAMINA_HOME": home, "LAMINA_THREADS": "2", "OMP_NUM_THREADS": "2"}
        proc = subprocess.Popen([sys.executable, "-m", "lamina", "serve", "--port", str(port), "--batch-concurrency",
                                 str(args.batch_concurrency)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            _wait_healthy(url, proc)
            asyncio.run(_ttfts(url, 3, 0.0))  # warm-up
            idle = asyncio.run(_ttfts(url, 20, 0.2))
            per_client = max(1, args.requests // 16)
            interactive = asyncio.run(_level(url, MODEL, 16, per_client, MAX_TOKENS))
            batch = asyncio.run(_batch(url, args.requests))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    p50 = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    p90 = lambda xs: sorted(xs)[int(0.9 * (len(xs) - 1))] if xs else float("nan")  # noqa: E731
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 2},
        "requests": args.requests, "max_tokens": MAX_TOKENS, "batch_concurrency": args.batch_concurrency,
        "interactive_16_clients": {k: interactive[k] for k in ("requests", "errors", "tokens", "wall_s", "tok_s", "ttft_p50_ms")},
        "batch": {k: v for k, v in batch.items() if k != "ttft_during_ms"},
        "ttft_idle_ms": {"p50": p50(idle), "p90": p90(idle), "n": len(idle)},
        "ttft_during_batch_ms": {"p50": p50(batch["ttft_during_ms"]), "p90": p90(batch["ttft_during_ms"]),
                                 "n": len(batch["ttft_during_ms"])},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

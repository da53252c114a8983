"""Scale-out: one replica against two, direct and through Ray Serve, and what the prefix-aware router buys.

Questions:
1. Aggregate decode throughput (completion tokens/s, 16 streaming clients, 48 new tokens each, the default
   model and precision) of one `lamina serve` with one thread against two replicas with one thread each, the
   clients dealt round robin over them; then the same through `lamina serve --ray --replicas 1|2` on a local
   Ray cluster (one CPU per replica), one endpoint in front.
2. On a shared-prefix workload (8 long system prompts, 64 requests in a shuffled order, a short question each),
   the prefix-cache hit rate (cached prompt tokens / prompt tokens, from each response's usage) when Ray Serve's
   front routes with the prefix-aware policy against round robin, two replicas.

    python bench/scale.py [--clients 16] [--requests-per-client 3]

Prints a table and writes bench/results/scale.json. Name the CPU with the figures: one replica per core here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import MODEL, _free_port, _one, _question, _wait_healthy

RAY = str(Path(sys.executable).parent / "ray")
MAX_TOKENS = 48
SYSTEMS = [f"You are assistant number {i}. " + ("Follow the house style guide: short sentences, plain words, no jargon, "
                                                  f"cite the manual section {i} when you can. ") * 12 for i in range(8)]


def _start(home: str, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LAMINA_HOME": home, "LAMINA_THREADS": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "serve", "--port", str(port), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_healthy(url, proc, timeout=600)
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def _load(urls: list[str], clients: int, per_client: int) -> dict:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(c: int) -> list[dict]:
            return [await _one(http, urls[c % len(urls)], MODEL, _question(c, i), MAX_TOKENS) for i in range(per_client)]

        await asyncio.gather(*(_one(http, u, MODEL, "Say hi.", 4) for u in urls))  # warm-up
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    return {"requests": len(results), "errors": len(results) - len(ok), "tokens": sum(r["tokens"] for r in ok),
            "wall_s": wall, "tok_s": sum(r["tokens"] for r in ok) / wall}


async def _prefix_workload(url: str) -> dict:
    order = [i % len(SYSTEMS) for i in range(64)]
    random.Random(0).shuffle(order)
    prompt = cached = 0
    replicas: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(n: int, s: int) -> None:
            nonlocal prompt, cached
            body = {"model": MODEL, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "system", "content": SYSTEMS[s]}, {"role": "user", "content": f"Question {n}: what now?"}]}
            r = await http.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            usage = r.json()["usage"]
            prompt += usage["prompt_tokens"]
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            replicas[r.headers.get("x-lamina-replica", "?")] = replicas.get(r.headers.get("x-lamina-replica", "?"), 0) + 1

        for start in range(0, len(order), 4):  # four at a time
            await asyncio.gather(*(one(start + j, s) for j, s in enumerate(order[start:start + 4])))
    return {"requests": len(order), "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / max(1, prompt),
            "per_replica": replicas}


def _ray_cluster(cpus: int) -> str:
    gcs = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", f"--num-cpus={cpus}", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    return f"127.0.0.1:{gcs}"


def _ray_stop() -> None:
    subprocess.run([RAY, "stop", "--force"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scale.json")
    args = parser.parse_args()
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                    "clients": args.clients, "max_tokens": MAX_TOKENS}
    with tempfile.TemporaryDirectory(prefix="lamina-bench-scale-") as home:
        for n in (1, 2):
            procs = [_start(home) for _ in range(n)]
            try:
                result[f"direct_{n}"] = asyncio.run(_load([u for _, u in procs], args.clients, args.requests_per_client))
            finally:
                for p, _ in procs:
                    _stop(p)
            print(f"direct, {n} replica(s): {result[f'direct_{n}']}", flush=True)
        for n, routing in ((1, "prefix"), (2, "prefix"), (2, "round_robin")):
            address = _ray_cluster(2)
            try:
                proc, url = _start(home, "--ray", "--ray-address", address, "--replicas", str(n), "--routing", routing)
                try:
                    if routing == "prefix":
                        result[f"ray_{n}"] = asyncio.run(_load([url], args.clients, args.requests_per_client))
                        print(f"ray, {n} replica(s): {result[f'ray_{n}']}", flush=True)
                    if n == 2:
                        result[f"prefix_workload_{routing}"] = asyncio.run(_prefix_workload(url))
                        print(f"prefix workload, {routing}: {result[f'prefix_workload_{routing}']}", flush=True)
                finally:
                    _stop(proc)
            finally:
                _ray_stop()
    for kind in ("direct", "ray"):
        if f"{kind}_1" in result and f"{kind}_2" in result:
            result[f"{kind}_speedup"] = result[f"{kind}_2"]["tok_s"] / result[f"{kind}_1"]["tok_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

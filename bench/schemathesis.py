"""Schemathesis, the long run: does the API do what its published schema (/openapi.json) says, over 10,000+
generated requests?

Question: for every operation, does any request give a 5xx, is any schema-valid request refused, and does
any response (body, status, headers, content type, Server-Sent Event) fall outside the schema? The server is
tests/api/schema_run.py's: `create_app` on uvicorn with a tiny random Llama and the real MiniLM embedder;
the same hooks as the short run in the test suite (tests/api/test_schema.py). Here every phase but stateful
runs in full: examples, the coverage phase in both modes (every boundary, positive and negative), then
`--max-examples` fuzzed cases per operation. The operations are split over `--processes` schemathesis
processes of one worker each.

    python bench/schemathesis.py [--max-examples 400] [--processes 2] [--seed 0]

Prints the responses per operation (cases, 2xx, 4xx, 5xx, failures) and writes bench/results/schemathesis.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.api.schema_run import Outcome, live_server, run_schemathesis  # noqa: E402


def _split(paths: list[str], parts: int) -> list[list[str]]:
    """Paths dealt round-robin into `parts` groups (generation-heavy ones first, so they spread)."""
    heavy = sorted(paths, key=lambda p: (not any(k in p for k in ("completions", "search", "embeddings", "files")), p))
    return [heavy[i::parts] for i in range(parts) if heavy[i::parts]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=400, help="fuzzed cases per operation")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a schemathesis process is stopped")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "schemathesis.json")
    args = parser.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lamina-schemathesis-") as tmp, live_server(Path(tmp)) as server:
        paths = list(httpx.get(f"{server.url}/openapi.json").json()["paths"])
        groups = _split(paths, args.processes)
        with ThreadPoolExecutor(len(groups)) as pool:
            outcomes: list[Outcome] = list(pool.map(
                lambda group: run_schemathesis(server, max_examples=args.max_examples, coverage="all", paths=group,
                                               seed=args.seed, timeout=args.timeout), groups))
    wall = time.perf_counter() - start

    rows, failures = [], Counter[str]()
    for outcome in outcomes:
        failures += outcome.failures_per_operation()
        for op, statuses in outcome.per_operation().items():
            rows.append({"operation": op, "cases": sum(statuses.values()),
                         "2xx": sum(n for s, n in statuses.items() if 200 <= s < 300),
                         "4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
                         "5xx": sum(n for s, n in statuses.items() if s >= 500),
                         "statuses": {str(s): n for s, n in sorted(statuses.items())}})
    for row in rows:
        row["failures"] = failures.get(row["operation"], 0)
    rows.sort(key=lambda r: r["operation"].split(" ", 1)[::-1])
    total = {k: sum(r[k] for r in rows) for k in ("cases", "2xx", "4xx", "5xx")}
    unique_failures = sum(o.report.get("test_cases", {}).get("unique_failures", 0) for o in outcomes)
    errors = sum(len(o.report.get("errors", [])) for o in outcomes)

    # The coverage phase also tries each path with the methods it does not have: one 405 each, folded into a row.
    probes = [r for r in rows if set(r["statuses"]) == {"405"}]
    shown = [r for r in rows if r not in probes]
    if probes:
        shown.append({"operation": f"other methods ({len(probes)} probes, all 405)", "cases": sum(r["cases"] for r in probes),
                      "2xx": 0, "4xx": sum(r["4xx"] for r in probes), "5xx": 0, "failures": sum(r["failures"] for r in probes)})
    width = max(len(r["operation"]) for r in shown)
    print(f"{'operation':<{width}}  {'cases':>7} {'2xx':>7} {'4xx':>7} {'5xx':>5} {'failures':>8}")
    for r in shown:
        print(f"{r['operation']:<{width}}  {r['cases']:>7} {r['2xx']:>7} {r['4xx']:>7} {r['5xx']:>5} {r['failures']:>8}")
    print(f"{'total':<{width}}  {total['cases']:>7} {total['2xx']:>7} {total['4xx']:>7} {total['5xx']:>5} {unique_failures:>8}")
    print(f"\n{total['cases']} cases, {unique_failures} unique failures, {errors} errors, {wall:.0f} s wall "
          f"({args.processes} processes, --max-examples {args.max_examples}, seed {args.seed})")
    for outcome in outcomes:
        if outcome.returncode != 0:
            print(outcome.output[-8000:])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "question": "does the API do what /openapi.json says (schemathesis: 5xx, refused valid data, responses off-schema)?",
        "max_examples": args.max_examples, "processes": args.processes, "seed": args.seed, "wall_seconds": round(wall, 1),
        "cases": total["cases"], "unique_failures": unique_failures, "errors": errors, "operations": rows,
        "returncodes": [o.returncode for o in outcomes],
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(0 if all(o.returncode == 0 for o in outcomes) else 1)


if __name__ == "__main__":
    main()

"""Structured outputs: does every output follow its JSON Schema, what does the constraint cost, against llama.cpp's
`llama-server` (`response_format` json_schema, compiled to its GBNF grammars), same GGUF, same prompts, same run.

Question: over a few hundred varied schemas (nesting, enums, arrays with min/max items, anyOf/oneOf, $ref, formats,
patterns, ranges, lengths, and a few keywords neither can enforce), how many of each server's answers parse and
validate (the `jsonschema` package, formats checked), which schemas each refuses (HTTP 4xx/5xx) and which it
loosens (accepts, then answers outside the schema)? And for Lamina: decode speed with a schema against the same
requests without one, at 1 and at 16 concurrent streams, and the time to compile a schema.

Both run as users start them (`lamina serve` with no flags; `llama-server -np 16 -c 65536`), 2 threads, greedy,
512 tokens at most. The prompt shows the schema (as llama.cpp's docs advise: the grammar constrains, the prompt
informs). The schemas are generated from a fixed seed (`schemas()`), so every run sees the same ones.

    python bench/structured.py [--count 240] [--streams 16]

Prints a summary and writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import llama_server
from serve import _free_port, _wait_healthy

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 512

THEMES = {
    "person": {"name": "string", "age": "integer", "email": "email", "city": "string", "member": "boolean"},
    "product": {"title": "string", "price": "number", "sku": "sku", "in_stock": "boolean", "category": "string"},
    "event": {"name": "string", "date": "date", "start": "date-time", "venue": "string", "seats": "integer"},
    "book": {"title": "string", "author": "string", "year": "integer", "isbn": "isbn", "rating": "number"},
    "recipe": {"dish": "string", "minutes": "integer", "vegetarian": "boolean", "servings": "integer", "cuisine": "string"},
    "city": {"name": "string", "country": "string", "population": "integer", "area_km2": "number", "capital": "boolean"},
    "order": {"order_id": "uuid", "customer": "string", "total": "number", "paid": "boolean", "placed": "date"},
    "server": {"host": "string", "port": "integer", "ip": "ipv4", "tls": "boolean", "region": "string"},
}
ENUMS = {"status": ["active", "inactive", "pending"], "color": ["red", "green", "blue", "black"], "size": ["S", "M", "L", "XL"],
         "priority": ["low", "medium", "high"], "unit": ["kg", "lb"]}


def _leaf(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "string":
        s: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.4:
            s["maxLength"] = rng.choice([12, 20, 40])
        if rng.random() < 0.2:
            s["minLength"] = 2
        return s
    if kind == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.6:
            s.update(minimum=rng.choice([0, 1, 10]), maximum=rng.choice([100, 1000, 100000]))
        return s
    if kind == "number":
        s = {"type": "number"}
        if rng.random() < 0.5:
            s.update(minimum=0, maximum=rng.choice([1, 100, 10000]))
        if rng.random() < 0.15:
            s["exclusiveMinimum"] = 0
            s.pop("minimum", None)
        return s
    if kind == "boolean":
        return {"type": "boolean"}
    if kind in ("email", "date", "date-time", "uuid", "ipv4"):
        return {"type": "string", "format": kind}
    if kind == "sku":
        return {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}
    if kind == "isbn":
        return {"type": "string", "pattern": "^97[89]-[0-9]{10}$"}
    raise ValueError(kind)


def _object(theme: str, rng: random.Random, depth: int) -> dict[str, Any]:
    fields = THEMES[theme]
    names = rng.sample(sorted(fields), k=rng.randint(2, len(fields)))
    props = {n: _leaf(fields[n], rng) for n in names}
    if rng.random() < 0.4:
        e = rng.choice(sorted(ENUMS))
        props[e] = {"enum": ENUMS[e]}
    if rng.random() < 0.3:
        props["tags"] = {"type": "array", "items": {"type": "string", "maxLength": 16},
                         "minItems": rng.choice([0, 1, 2]), "maxItems": rng.choice([3, 5])}
    if depth > 0 and rng.random() < 0.5:
        other = rng.choice(sorted(THEMES))
        props[other] = _object(other, rng, depth - 1)
    if rng.random() < 0.25:
        props["note"] = {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]}
    required = [n for n in props if rng.random() < 0.75] or [next(iter(props))]
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.6:
        schema["additionalProperties"] = False
    return schema


def schemas(count: int, seed: int = 2026) -> list[dict[str, Any]]:
    """`count` schemas: mostly themed objects of every feature, then lists, $refs, unions, and a few hard keywords."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    themes = sorted(THEMES)
    while len(out) < count:
        theme = themes[len(out) % len(themes)]
        kind = rng.random()
        if kind < 0.55:
            s = _object(theme, rng, depth=rng.choice([0, 1, 2]))
        elif kind < 0.7:
            s = {"type": "array", "items": _object(theme, rng, 0), "minItems": 1, "maxItems": rng.choice([2, 3, 4])}
        elif kind < 0.8:
            inner = _object(theme, rng, 0)
            s = {"$defs": {theme: inner}, "type": "object",
                 "properties": {"first": {"$ref": f"#/$defs/{theme}"}, "second": {"$ref": f"#/$defs/{theme}"}},
                 "required": ["first", "second"], "additionalProperties": False}
        elif kind < 0.88:
            s = {"type": "object", "properties": {"result": {"oneOf": [
                {"type": "object", "properties": {"ok": {"const": True}, "value": _leaf("integer", rng)}, "required": ["ok", "value"],
                 "additionalProperties": False},
                {"type": "object", "properties": {"ok": {"const": False}, "error": {"type": "string", "maxLength": 40}},
                 "required": ["ok", "error"], "additionalProperties": False}]}}, "required": ["result"]}
        elif kind < 0.96:
            s = {"type": "object", "properties": {theme: _object(theme, rng, 1), "count": {"type": "integer", "minimum": 1, "maximum": 9},
                                                  "level": {"enum": [1, 2, 3]}}, "required": [theme, "count", "level"]}
        else:  # keywords that cannot be enforced token by token (the honest answer is a refusal)
            hard = rng.choice([{"uniqueItems": True}, {"contains": {"const": "x"}}])
            s = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                            "maxItems": 4, **hard}}, "required": ["items"]}
        s["title"] = f"{theme}-{len(out)}"
        out.append(s)
    return out


def _prompt(schema: dict[str, Any]) -> list[dict[str, str]]:
    theme = schema["title"].split("-")[0]
    return [{"role": "user", "content": f"Write an example {theme} as JSON that follows this JSON Schema:\n{json.dumps(schema)}"}]


def _validate(schema: dict[str, Any], text: str) -> str | None:
    """None if `text` is JSON valid against `schema` (formats checked), else why not."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value), key=lambda e: e.path)
    return errors[0].message[:160] if errors else None


def _start(kind: str, home: Path, streams: int) -> tuple[subprocess.Popen, str]:
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
               "-t", "2", "-tb", "2", "-np", str(streams), "-c", str(4096 * streams), "--alias", MODEL, "--jinja"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_healthy(url, proc)
    return proc, url


REPEATS = 3
"""Throughput pairs (constrained, then the same tokens free) per stream count; the median ratio is reported."""
STRICT = True
"""Send schemas in OpenAI's strict mode (what the SDKs' `parse()` sends): objects that leave additionalProperties
unsaid are closed. llama.cpp's converter closes them anyway (its documented default), so this is the like-for-like
request; `--no-strict` measures JSON Schema's open objects."""


def _ask(url: str, schema: dict[str, Any] | None, messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS,
         ignore_eos: bool = False, salt: str | None = None) -> dict[str, Any]:
    """One streamed chat request: status, text, token stamps."""
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": STRICT}}
    if ignore_eos:
        body["ignore_eos"] = True
    if salt is not None:
        body["cache_salt"] = salt  # (Lamina's: no prefix reuse across the runs compared)
    stamps, text, finish, tokens = [], [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code >= 400:
            r.read()
            return {"status": r.status_code, "error": r.text[:300]}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    stamps.append(time.perf_counter())
                finish = ch.get("finish_reason") or finish
    return {"status": 200, "text": "".join(text), "finish": finish, "stamps": stamps, "tokens": tokens or len(stamps)}


def _validity(url: str, all_schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in all_schemas:
        r = _ask(url, s, _prompt(s))
        row = {"title": s["title"], "status": r["status"]}
        if r["status"] == 200:
            row.update(finish=r["finish"], tokens=r["tokens"], error=_validate(s, r["text"]), text=r["text"][:400])
        else:
            row["refusal"] = r["error"]
        rows.append(row)
    return rows


def _throughput(url: str, picked: list[dict[str, Any]], streams: int, rounds: int = 8) -> dict[str, float]:
    """Decode tok/s of requests with the schema against the same requests without it, each of those run to the
    constrained answer's length (end-of-sequence ignored) so both decode the same tokens: `streams` at once
    (aggregate tok/s over the decode window), or one at a time (`streams` 1: `rounds` requests, tokens over the sum
    of their decode windows)."""
    def run(requests: list[tuple[dict[str, Any] | None, list[dict[str, str]], int, bool, str]]) -> tuple[float, list[int]]:
        if streams == 1:
            results = [_ask(url, *r) for r in requests]
            windows = sum(r["stamps"][-1] - r["stamps"][0] for r in results if len(r["stamps"]) > 1)
            return sum(len(r["stamps"]) - 1 for r in results) / windows, [len(r["stamps"]) for r in results]
        with futures.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda r: _ask(url, *r), requests))
        stamps = [t for r in results for t in r["stamps"]]
        return len(stamps) / (max(stamps) - min(stamps)), [len(r["stamps"]) for r in results]

    batch = picked[: max(streams, rounds) if streams == 1 else streams]
    pairs = []
    for i in range(REPEATS):  # constrained then free, REPEATS times: the machine's drift lands on both sides
        constrained, lengths = run([(s, _prompt(s), MAX_TOKENS, False, f"constrained-{streams}-{i}") for s in batch])
        free, _ = run([(None, _prompt(s), max(2, n), True, f"free-{streams}-{i}") for s, n in zip(batch, lengths, strict=True)])
        pairs.append((constrained, free))
    ratios = sorted(c / f for c, f in pairs)
    return {"constrained_tok_s": statistics.median(c for c, _ in pairs), "unconstrained_tok_s": statistics.median(f for _, f in pairs),
            "ratio": statistics.median(ratios), "ratios": ratios}


def _compile_times(all_schemas: list[dict[str, Any]]) -> dict[str, float]:
    from lamina.errors import InvalidRequestError
    from lamina.infra.registry import Registry
    from lamina.llm.engine.grammar import Grammars, StructuredOutput
    from lamina.llm.formats.loader import read_checkpoint

    ckpt = read_checkpoint(Registry(Path(tempfile.mkdtemp())).resolve(MODEL))
    grammars = Grammars(ckpt.tokenizer.backend.to_str(), ckpt.eos_ids[0], ckpt.config.vocab_size)
    grammars.tokenizer  # noqa: B018 (built before the clock starts, as the server builds it at startup)
    times = []
    for s in all_schemas:
        start = time.perf_counter()
        try:
            grammars.check(StructuredOutput("json_schema", s))
        except InvalidRequestError:
            continue
        times.append(time.perf_counter() - start)
    times.sort()
    return {"p50_ms": statistics.median(times) * 1e3, "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3, "max_ms": times[-1] * 1e3,
            "compiled": len(times)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    answered = [r for r in rows if r["status"] == 200]
    valid = [r for r in answered if r.get("error") is None]
    return {"schemas": len(rows), "refused": len(rows) - len(answered), "answered": len(answered), "valid": len(valid),
            "valid_share_of_answered": len(valid) / max(1, len(answered)),
            "cut_by_max_tokens": sum(r.get("finish") == "length" for r in answered),
            "loosened": sum(r.get("finish") == "stop" and r.get("error") is not None for r in answered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--no-strict", action="store_true", help="send schemas without strict (open objects stay open)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured.json")
    args = parser.parse_args()
    from lamina.infra.device import cpu_features

    global STRICT
    STRICT = not args.no_strict
    all_schemas = schemas(args.count)
    compile_times = _compile_times(all_schemas)
    print(f"compile: p50 {compile_times['p50_ms']:.2f} ms, p99 {compile_times['p99_ms']:.2f} ms ({compile_times['compiled']} schemas)")
    home = Path(tempfile.mkdtemp(prefix="lamina-structured-"))
    results: dict[str, Any] = {}
    for kind in ("lamina", "llama-server"):
        proc, url = _start(kind, home, args.streams)
        try:
            _ask(url, None, [{"role": "user", "content": "Hi"}], 8)  # warm-up
            rows = _validity(url, all_schemas)
            results[kind] = {"summary": _summary(rows), "rows": rows}
            print(kind, json.dumps(results[kind]["summary"]), flush=True)
            if kind == "lamina":
                ok = [s for s, r in zip(all_schemas, rows, strict=True) if r["status"] == 200]
                results[kind]["throughput"] = {f"{n}_streams": _throughput(url, ok, n) for n in (1, args.streams)}
                print(kind, json.dumps(results[kind]["throughput"]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    machine = {"cpu": platform.processor() or platform.machine(), "features": cpu_features(), "threads": 2}
    args.out.write_text(json.dumps({"machine": machine, "max_tokens": MAX_TOKENS, "strict": STRICT, "compile": compile_times, **results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()

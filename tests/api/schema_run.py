"""Schemathesis against a real server: the API's published schema (/openapi.json) against what it does.

`live_server` serves `create_app` with uvicorn on a free loopback port, over a tiny random Llama (written
here without transformers, so it takes a second) and the real MiniLM embedder, and seeds a vector store
and files for the operations that need ids. `run_schemathesis` runs schemathesis' `st run` against it as a
subprocess with `tests/api/schema_hooks.py`, and returns its exit code, output and the responses per
operation. Both the test suite's short run (tests/api/test_schema.py) and the long one
(bench/schemathesis.py) go through here.

The hooks do what a client that read /v1/models would: they send the served model's id, token ids within
its vocabulary, short `max_tokens` (so a case takes milliseconds), and keep to the rules the schema
documents but cannot state (a static chunk the embedding model can read, `best_of` equal to `n`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.server import free_port
from tests.tiny import CHAT_TEMPLATE, SPECIALS, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
          "response_schema_conformance", "positive_data_acceptance")
VOCAB = 400
CONTEXT = 4096
"""A long context, so generated conversations fit and requests are never refused for their length."""


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama as a Hugging Face folder (config, safetensors, tokenizer, chat template)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dim, hidden, heads, kv_heads, layers = 64, 160, 4, 2, 2
    head_dim = dim // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": dim,
              "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": CONTEXT,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, dim), "model.norm.weight": (dim,), "lm_head.weight": (VOCAB, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (heads * head_dim, dim), p + "self_attn.k_proj.weight": (kv_heads * head_dim, dim),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, dim), p + "self_attn.o_proj.weight": (dim, heads * head_dim),
                   p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
                   p + "mlp.down_proj.weight": (dim, hidden), p + "input_layernorm.weight": (dim,),
                   p + "post_attention_layernorm.weight": (dim,)}
    save_file({name: (1 + 0.1 * torch.randn(shape, generator=g)) if len(shape) == 1 else 0.05 * torch.randn(shape, generator=g)
               for name, shape in shapes.items()}, str(folder / "model.safetensors"))
    train_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "unk_token": SPECIALS[0], "pad_token": SPECIALS[0],
        "chat_template": CHAT_TEMPLATE, "model_max_length": CONTEXT}))
    return folder


@dataclass
class LiveServer:
    url: str
    model: str
    embedder: str
    ids: dict[str, Any] = field(default_factory=dict)
    """Seeded ids for the hooks' path parameters: `store_id` and `file_id`, and for each DELETE, ids of its own."""


@contextmanager
def live_server(root: Path) -> Iterator[LiveServer]:
    """The API app on uvicorn in a thread of this process, ready (models loaded) and seeded."""
    import uvicorn

    from lamina.api.app import ServeArgs, create_app
    from lamina.settings import Settings

    folder = write_tiny_model(root / "tiny-llama")
    home = root / "home"
    # native=False: PyTorch's kernels, so that no kernel is built and timed for a model that lives for one test.
    app = create_app(ServeArgs(Settings(model=str(folder), home=home, device="cpu", dtype="float32", native=False)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="schema-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the schema-test server did not become healthy in 120 s")
                time.sleep(0.1)
            live = LiveServer(url, folder.name, "all-minilm-l6-v2")
            live.ids = _seed(client)
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _seed(client: httpx.Client) -> dict[str, Any]:
    def upload(name: str, text: str, purpose: str = "assistants") -> str:
        r = client.post("/v1/files", files={"file": (name, text.encode())}, data={"purpose": purpose})
        r.raise_for_status()
        return r.json()["id"]

    def store(name: str, file_id: str) -> str:
        r = client.post("/v1/vector_stores", json={"name": name, "file_ids": [file_id]})
        r.raise_for_status()
        return r.json()["id"]

    kept = upload("notes.txt", "The quick brown fox jumps over the lazy dog. Lamina runs on plain PyTorch.")
    kept_store = store("seeded", kept)
    unlinked = upload("unlinked.txt", "This file leaves the seeded store.")
    client.post(f"/v1/vector_stores/{kept_store}/files", json={"file_id": unlinked}).raise_for_status()
    doomed = upload("doomed.txt", "This file is here to be deleted.")
    model = client.get("/v1/models").json()["data"][0]["id"]
    requests = upload("requests.jsonl", json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}}), purpose="batch")
    batch = client.post("/v1/batches", json={"input_file_id": requests, "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
    batch.raise_for_status()
    # Each DELETE gets ids of its own, so that it deletes something and the other operations still find theirs.
    return {"store_id": kept_store, "file_id": kept, "batch_file_id": requests, "batch_id": batch.json()["id"],
            "DELETE /v1/vector_stores/{store_id}": {"store_id": store("doomed", doomed)},
            "DELETE /v1/files/{file_id}": {"file_id": doomed},
            "DELETE /v1/vector_stores/{store_id}/files/{file_id}": {"store_id": kept_store, "file_id": unlinked}}


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float
    responses: Counter[tuple[str, str, int]]
    """(method, path template, status) -> how many responses."""
    report: dict

    @property
    def cases(self) -> int:
        return sum(self.responses.values())

    def per_operation(self) -> dict[str, Counter[int]]:
        out: dict[str, Counter[int]] = {}
        for (method, path, status), n in sorted(self.responses.items()):
            out.setdefault(f"{method} {path}", Counter())[status] += n
        return out

    def failures_per_operation(self) -> Counter[str]:
        """Kinds of failure (schemathesis' groups: ST101 server error, ST202 valid data refused, ...) per operation."""
        return Counter(op for group in self.report.get("failures", []) for op in group.get("operations", []))


def run_schemathesis(server: LiveServer, *, max_examples: int, coverage: str = "positive", paths: list[str] | None = None,
                     max_time: float | None = None, seed: int | None = 0, timeout: float = 600) -> Outcome:
    """`st run` over the server's /openapi.json: every phase but stateful, `max_examples` fuzzed cases per
    operation, the coverage phase in `coverage` mode ("positive", "negative" or "all"), every check in CHECKS;
    only the operations on `paths` when given.

    One worker: schemathesis' threads race in Hypothesis' lambda-source cache on Python 3.11 (a SystemError
    "AST constructor recursion depth mismatch" now and then); run several processes to go faster."""
    with tempfile.TemporaryDirectory(prefix="schemathesis-") as tmp:
        work = Path(tmp)
        config = work / "schemathesis.toml"
        if coverage == "all":
            config.write_text("")
        else:
            config.write_text(f'[phases.coverage.generation]\nmode = "{coverage}"\n')
        responses = work / "responses.tsv"
        command = [str(Path(sys.executable).with_name("st")), "--config-file", str(config), "run", f"{server.url}/openapi.json",
                   "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing", "--max-examples", str(max_examples),
                   "--workers", "1", "--request-timeout", "60", "--no-shrink", "--output-truncate", "true",
                   "--report", "json", "--report-json-path", str(work / "report.json")]
        if seed is not None:
            command += ["--seed", str(seed)]
        if max_time is not None:
            command += ["--max-time", str(max_time)]
        for path in paths or ():
            command += ["--include-path", path]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schema_hooks", "PYTHONPATH": str(ROOT),
               "LAMINA_SCHEMA_MODEL": server.model, "LAMINA_SCHEMA_EMBEDDER": server.embedder,
               "LAMINA_SCHEMA_VOCAB": str(VOCAB), "LAMINA_SCHEMA_IDS": json.dumps(server.ids),
               "LAMINA_SCHEMA_RESPONSES": str(responses)}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        counts: Counter[tuple[str, str, int]] = Counter()
        if responses.exists():
            for line in responses.read_text().splitlines():
                method, path, status = line.split("\t")
                counts[(method, path, int(status))] += 1
        report_file = work / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return Outcome(done.returncode, done.stdout + done.stderr, seconds, counts, report)

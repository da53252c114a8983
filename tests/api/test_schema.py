"""The published schema is what the server does: schemathesis over /openapi.json finds no mismatch.

A short run against a real uvicorn server (tiny random model, real embedder): every operation, the
examples, the coverage phase's positive cases (boundaries of every constraint) and a few fuzzed cases per
operation, positive and negative. It fails on any 5xx, on any schema-valid request that is refused, and on
any response, status, header or content type the schema does not describe. bench/schemathesis.py is the
long run (over 10,000 cases).
"""

from __future__ import annotations

import pytest

from tests.api.schema_run import live_server, run_schemathesis

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.e2e


def test_schemathesis_finds_no_mismatch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with live_server(tmp_path) as server:
        outcome = run_schemathesis(server, max_examples=8, coverage="positive", timeout=240)
    assert outcome.returncode == 0, outcome.output[-20_000:]
    tested = {op for op, statuses in outcome.per_operation().items() if statuses}
    assert len(tested) >= 17, sorted(tested)  # every operation was called
    assert outcome.report["test_cases"]["with_failures"] == 0
    ok = {op for op, statuses in outcome.per_operation().items() if any(200 <= s < 300 for s in statuses)}
    for op in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "POST /tokenize",
               "POST /v1/vector_stores/{store_id}/search", "POST /v1/vector_stores/{store_id}/files"):
        assert op in ok, f"{op} never succeeded: {outcome.per_operation().get(op)}"

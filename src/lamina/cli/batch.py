"""`lamina batch`: OpenAI's Batch API on a running `lamina serve`, from the command line.

    lamina batch create requests.jsonl [--endpoint /v1/chat/completions] [--wait -o results.jsonl]
    lamina batch list | get ID | cancel ID | results ID [-o FILE] [--errors]

The server is LAMINA_HOST:LAMINA_PORT (or --url) and the key LAMINA_API_KEY (or --api-key), as for any client.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from lamina.cli.common import fail_cleanly
from lamina.errors import InvalidRequestError
from lamina.settings import get_settings

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


class _Server:
    def __init__(self, url: str | None, api_key: str | None) -> None:
        import httpx

        settings = get_settings()
        self.url = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
        key = api_key or settings.api_key
        self.client = httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {})

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise InvalidRequestError(f"cannot reach the server at {self.url} ({e}); start it with `lamina serve` or pass --url") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise InvalidRequestError(f"{method} {path}: HTTP {r.status_code}: {message}")
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content


def _options(fn: Any) -> Any:
    fn = click.option("--url", default=None, help="the server [default http://LAMINA_HOST:LAMINA_PORT]")(fn)
    return click.option("--api-key", default=None, help="the key to send [LAMINA_API_KEY]")(fn)


def _line(b: dict[str, Any]) -> str:
    c = b["request_counts"]
    return f"{b['id']}  {b['status']:<11} {c['completed']}/{c['total']} done, {c['failed']} failed  {b['endpoint']}"


@click.group("batch")
def batch_group() -> None:
    """OpenAI's Batch API on a running server: JSONL requests in, results joined on custom_id out."""


@batch_group.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", type=click.Choice(ENDPOINTS), default="/v1/chat/completions", show_default=True)
@click.option("--wait", is_flag=True, help="wait until it ends, then write the results")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="with --wait: where the output lines go [default: stdout]")
@_options
@fail_cleanly
def batch_create(file: Path, endpoint: str, wait: bool, output: Path | None, url: str | None, api_key: str | None) -> None:
    """Upload FILE (one {"custom_id", "method", "url", "body"} per line) and start a batch; prints its id."""
    server = _Server(url, api_key)
    upload = server.call("POST", "/v1/files", files={"file": (file.name, file.read_bytes())}, data={"purpose": "batch"})
    batch = server.call("POST", "/v1/batches", json={"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"})
    click.echo(batch["id"])
    if not wait:
        click.echo(f"{batch['request_counts']['total']} requests; `lamina batch get {batch['id']}` shows progress", err=True)
        return
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(1.0)
        batch = server.call("GET", f"/v1/batches/{batch['id']}")
        click.echo(_line(batch), err=True)
    _results(server, batch, output, errors=False)
    if batch.get("error_file_id"):
        click.echo(f"{batch['request_counts']['failed']} requests failed: `lamina batch results {batch['id']} --errors`", err=True)


@batch_group.command("list")
@_options
@fail_cleanly
def batch_list(url: str | None, api_key: str | None) -> None:
    """The key's batches, newest first."""
    for b in _Server(url, api_key).call("GET", "/v1/batches", params={"limit": 100})["data"]:
        click.echo(_line(b))


@batch_group.command("get")
@click.argument("batch_id")
@_options
@fail_cleanly
def batch_get(batch_id: str, url: str | None, api_key: str | None) -> None:
    """One batch as JSON."""
    import json

    click.echo(json.dumps(_Server(url, api_key).call("GET", f"/v1/batches/{batch_id}"), indent=2))


@batch_group.command("cancel")
@click.argument("batch_id")
@_options
@fail_cleanly
def batch_cancel(batch_id: str, url: str | None, api_key: str | None) -> None:
    """Stop a batch: running lines finish, the rest never start; the results so far are kept."""
    click.echo(_line(_Server(url, api_key).call("POST", f"/v1/batches/{batch_id}/cancel")))


@batch_group.command("results")
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="[default: stdout]")
@click.option("--errors", is_flag=True, help="the error file instead of the output file")
@_options
@fail_cleanly
def batch_results(batch_id: str, output: Path | None, errors: bool, url: str | None, api_key: str | None) -> None:
    """A batch's output lines (or, with --errors, its error lines), as JSONL."""
    server = _Server(url, api_key)
    _results(server, server.call("GET", f"/v1/batches/{batch_id}"), output, errors)


def _results(server: _Server, batch: dict[str, Any], output: Path | None, errors: bool) -> None:
    file_id = batch.get("error_file_id" if errors else "output_file_id")
    if not file_id:
        raise InvalidRequestError(f"batch {batch['id']} ({batch['status']}) has no {'error' if errors else 'output'} file")
    data = server.call("GET", f"/v1/files/{file_id}/content")
    data = data if isinstance(data, bytes) else str(data).encode()
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        from lamina.infra.fs import atomic_write_bytes

        atomic_write_bytes(output, data)
        click.echo(f"wrote {output}", err=True)

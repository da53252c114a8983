"""A real `lamina serve` process on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    home: Path
    proc: subprocess.Popen
    log: Path
    env: dict[str, str] | None = None
    """Environment beyond LAMINA_HOME that the server (and `lamina` commands against it) run with."""

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def lamina(self, *args: str) -> subprocess.CompletedProcess:
        """Run a `lamina` command against this server's LAMINA_HOME."""
        env = {**os.environ, **(self.env or {}), "LAMINA_HOME": str(self.home)}
        return subprocess.run([sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=env, timeout=120)


def start_server(home: Path, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    extra = env
    env = {**os.environ, **(extra or {}), "LAMINA_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "--port", str(port), *args],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", home, proc, log, extra)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lamina serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"lamina serve did not become healthy in {timeout} s:\n{log.read_text()}")

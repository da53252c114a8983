"""Lamina's settings, read once from `LAMINA_*` environment variables (and a `.env` file).

Each value has one owner here; code takes the values it needs as arguments rather than reading the
environment itself, so tests and the composition root (`lamina.cli`) decide what is used.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMINA_", env_file=".env", extra="ignore")

    home: Path = Path("~/.lamina")
    """Where Lamina keeps its state: registered models, caches, databases (LAMINA_HOME)."""
    cache: Path | None = None
    """What is measured or built for this machine, not for a home: speed probes and the compiled native kernels
    (LAMINA_CACHE); None keeps them in LAMINA_HOME/cache. Several homes on one machine can share one."""
    database_url: str | None = None
    """The database (LAMINA_DATABASE_URL): a postgresql://user:password@host/db URL, shared by every replica that
    names it; None keeps the embedded SQLite file LAMINA_HOME/lamina.db."""
    model: str = "smollm2-135m-instruct"
    """The model used when a command is given none (LAMINA_MODEL)."""
    device: str = "auto"
    """auto|cpu|cuda|cuda:N|mps (LAMINA_DEVICE)."""
    dtype: str = "auto"
    """auto|float32|bfloat16|float16 (LAMINA_DTYPE)."""
    quantize: str = "auto"
    """auto|none|int8|int4 (LAMINA_QUANTIZE). auto: a GGUF whose weights are all Q4_1 (Q8_0) blocks is served on
    those very blocks, int4 (int8), where the native CPU kernels run and no dtype was asked for; else floats."""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default, one per physical core (LAMINA_THREADS)."""
    host: str = "127.0.0.1"
    """Address `lamina serve` listens on (LAMINA_HOST)."""
    port: int = 8000
    """Port `lamina serve` listens on (LAMINA_PORT)."""
    api_key: str | None = None
    """A single static API key for `lamina serve`, like vLLM's --api-key (LAMINA_API_KEY)."""
    native: bool = True
    """Lamina's native C kernels; False (LAMINA_NATIVE=0) serves with PyTorch's forward and kernels instead."""
    native_march: str = "native"
    """The `-march` the native kernels are compiled for, e.g. haswell for the AVX2 path (LAMINA_NATIVE_MARCH)."""
    cc: str = Field("cc", validation_alias=AliasChoices("LAMINA_CC", "CC"))
    """The C compiler that builds the native kernels (LAMINA_CC, else CC); "cc" means cc or gcc on PATH."""

    @field_validator("home", "cache")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    def database_for(self, home: Path) -> str | Path:
        """The database of `home`: LAMINA_DATABASE_URL where set, else home/lamina.db."""
        return self.database_url or home / "lamina.db"

    def cache_for(self, home: Path) -> Path:
        """The machine cache of `home`: LAMINA_CACHE where set, else home/cache."""
        return self.cache if self.cache is not None else home / "cache"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read on first use (never at import)."""
    return Settings()

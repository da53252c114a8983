"""A model that loads in the background while the server already answers: 503 until it is there.

The app factory builds the services at once (so /health and the routes exist from the first request) and
hands each a `Loading` for its model; the lifespan's loader thread fills it. The services themselves are
never changed after they are built.
"""

from __future__ import annotations

import concurrent.futures
from typing import Generic, TypeVar

from lamina.api.errors import APIError

T = TypeVar("T")


class Loading(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        """What loads, for the error text ("the model", "the embedding model")."""
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def set(self, value: T) -> None:
        self._future.set_result(value)

    def fail(self, error: BaseException) -> None:
        self._future.set_exception(error)

    @property
    def value(self) -> T | None:
        """The loaded object, or None while loading or after a failure (never blocks)."""
        if self._future.done() and self._future.exception() is None:
            return self._future.result()
        return None

    @property
    def error(self) -> str | None:
        """Why loading failed ("Type: message"), or None."""
        if not self._future.done() or self._future.exception() is None:
            return None
        e = self._future.exception()
        return f"{type(e).__name__}: {e}"

    def get(self) -> T:
        """The loaded object; a 503 while it loads or when it failed to load."""
        value = self.value
        if value is not None:
            return value
        if self.error is not None:
            raise APIError(503, f"{self.what.capitalize()} failed to load: {self.error}", code="model_load_failed")
        raise APIError(503, f"{self.what.capitalize()} is still loading; retry in a few seconds.", code="model_loading",
                       headers={"retry-after": "2"})

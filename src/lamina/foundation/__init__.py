"""Layer 3, foundation models: tokenizers, data preparation, training and evaluation, embeddings.

`Embedder` is imported lazily so that `lamina.foundation.tokenizer` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Embedder", "Embeddings"]

if TYPE_CHECKING:
    from lamina.foundation.embeddings import Embedder, Embeddings


def __getattr__(name: str) -> Any:
    if name in ("Embedder", "Embeddings"):
        import lamina.foundation.embeddings

        return getattr(lamina.foundation.embeddings, name)
    raise AttributeError(f"module 'lamina.foundation' has no attribute {name!r}")

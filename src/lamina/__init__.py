"""Lamina: a six-layer generative-AI stack on plain PyTorch.

    from lamina import LLM, Embedder
    llm = LLM.load("smollm2-135m-instruct")
    embedder = Embedder.load("all-minilm-l6-v2")

The public names are imported lazily, so `import lamina` stays cheap (no torch until it is needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "Embedder", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from lamina.foundation.embeddings import Embedder
    from lamina.llm import LLM, SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "SamplingParams"):
        import lamina.llm

        return getattr(lamina.llm, name)
    if name == "Embedder":
        import lamina.foundation.embeddings

        return lamina.foundation.embeddings.Embedder
    raise AttributeError(f"module 'lamina' has no attribute {name!r}")

"""Lamina: a six-layer generative-AI stack on plain PyTorch.

    from lamina import LLM
    llm = LLM.load("smollm2-135m-instruct")

The public names are imported lazily, so `import lamina` stays cheap (no torch until it is needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from lamina.llm import LLM, SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "SamplingParams"):
        import lamina.llm

        return getattr(lamina.llm, name)
    raise AttributeError(f"module 'lamina' has no attribute {name!r}")

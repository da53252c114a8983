"""Layer 4, LLM: checkpoints (GGUF, Hugging Face), tokenizers and chat templates, sampling, the engine."""

from lamina.llm.engine.sampling import SamplingParams
from lamina.llm.llm import LLM, Completion
from lamina.llm.text.stream import Delta

__all__ = ["LLM", "Completion", "Delta", "SamplingParams"]

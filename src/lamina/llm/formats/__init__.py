"""Checkpoint formats: GGUF files, Hugging Face folders, and the loader that turns either into a config, weights and a tokenizer. Knows nothing of the engine."""

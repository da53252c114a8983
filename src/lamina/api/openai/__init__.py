"""The OpenAI-compatible surface: chat completions, completions, models, embeddings, tokenize; wire models and the service behind the routes."""

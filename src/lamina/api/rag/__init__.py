"""The RAG surface: files, vector stores, search, in OpenAI's shapes."""

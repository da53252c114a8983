"""Text around the engine: chat templates, incremental detokenizing, and the stream of text deltas with stop strings."""

"""The generation engine (vLLM's split): the scheduler, the model runner and its KV slots, sampling, and the async front that drives it from one worker thread. Token ids only."""

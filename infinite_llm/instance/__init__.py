"""An instance: an engine of its own (scheduler, rManager, model, KV cache, attention service)."""

"""Infinite-LLM: LLM serving for long contexts with DistAttention and a distributed KV cache."""

from infinite_llm.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for the torch-free control plane) must not import torch.
    if name in ("LLM", "LLMEngine"):
        from infinite_llm import engine

        return getattr(engine, name)
    raise AttributeError(name)

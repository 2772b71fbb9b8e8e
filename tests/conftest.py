"""Shared pytest configuration and fixtures."""

import os

import pytest

# Keep HF libraries fully offline in tests: nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def engines():
    """A factory of LLMs (tests.engine_helpers.make_llm) that shuts them all down afterwards:
    every instance runs threads of its own."""
    from tests.engine_helpers import make_llm

    made = []

    def make(*args, **kwargs):
        llm = make_llm(*args, **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()

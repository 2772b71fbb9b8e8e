"""An instance's torch set-up runs on a thread that exits (instance/scratch_thread.py): the
caller's thread must not keep an OpenMP pool that slows every parallel region of the steps."""

from __future__ import annotations

import threading

import pytest

from infinite_llm.instance import kv_cache
from infinite_llm.instance.scratch_thread import run_on_scratch_thread
from infinite_llm.model import loader
from infinite_llm.sampling import SamplingParams
from tests.engine_helpers import make_llm
from tests.hf_fixtures import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-scratch")
    write_tiny_checkpoint(path, arch="llama", seed=5)
    return path


def test_returns_the_result_from_another_thread_that_has_exited():
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert run_on_scratch_thread(work) == 42
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_reraises_the_exception_in_the_caller():
    def fail() -> None:
        raise KeyError("no such weight")

    with pytest.raises(KeyError, match="no such weight"):
        run_on_scratch_thread(fail)


def test_local_cluster_loads_the_model_and_allocates_kv_off_the_callers_thread(monkeypatch, tiny_checkpoint):
    threads: dict[str, list[threading.Thread]] = {"load": [], "kv": []}
    real_load, real_kv_init = loader.load_model, kv_cache.PagedKVCache.__init__

    def load_model(*args, **kwargs):
        threads["load"].append(threading.current_thread())
        return real_load(*args, **kwargs)

    def kv_init(self, *args, **kwargs):
        threads["kv"].append(threading.current_thread())
        real_kv_init(self, *args, **kwargs)

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(kv_cache.PagedKVCache, "__init__", kv_init)
    llm = make_llm(tiny_checkpoint, instances=2)
    try:
        llm.engine.add_instance()
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].output_token_ids) == 4
    finally:
        llm.shutdown()
    assert len(threads["load"]) == 1 and len(threads["kv"]) == 3  # two instances, then one added
    for thread in threads["load"] + threads["kv"]:
        assert thread is not threading.current_thread()
        assert not thread.is_alive()

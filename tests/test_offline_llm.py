"""The offline `LLM.generate()` API: any number of prompts whatever the waiting-queue bound, all
prompts checked before any is queued, and an LLM that stays usable after a failed call."""

from __future__ import annotations

import pytest

from infinite_llm.control.scheduler import RequestTooLongError
from infinite_llm.sampling import SamplingParamError, SamplingParams
from tests.engine_helpers import assert_all_free, prompts
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-offline"), arch="llama", seed=8)


def test_more_prompts_than_the_waiting_queue_holds(checkpoint, engines):
    llm = engines(checkpoint, max_waiting=2, max_num_seqs=2)
    batch = prompts(21, [5, 9, 3, 12, 7, 4, 10])
    outputs = llm.generate(batch, GREEDY)
    assert [o.prompt_token_ids for o in outputs] == batch  # in the prompts' order
    for prompt, out in zip(batch, outputs):
        assert out.finish_reason == "length"
        assert out.output_token_ids == hf_greedy(checkpoint, prompt, 4)
    assert not llm.engine.has_unfinished_requests()
    assert_all_free(llm)


def _bad_sampling() -> SamplingParams:
    params = SamplingParams(temperature=0.0, max_tokens=4)
    params.top_p = 0.0  # changed after construction, so only generate()'s own check can catch it
    return params


@pytest.mark.parametrize(
    "bad_prompt, bad_params, error",
    [
        ([5] * 3000, GREEDY, RequestTooLongError),
        ([5, 6, 10**9], GREEDY, ValueError),  # a token id outside the vocabulary
        ([5, 6, 7], _bad_sampling(), SamplingParamError),
    ],
    ids=["too-long", "bad-token-id", "bad-sampling-params"],
)
def test_an_invalid_prompt_fails_the_call_before_anything_is_queued(checkpoint, engines, bad_prompt,
                                                                     bad_params, error):
    llm = engines(checkpoint, blocks=64)
    good = prompts(22, [5, 6, 7])
    params = [GREEDY, GREEDY, bad_params, GREEDY]
    with pytest.raises(error):
        llm.generate(good[:2] + [bad_prompt] + good[2:], params)
    assert not llm.engine.has_unfinished_requests()
    assert_all_free(llm)
    again = llm.generate(good, GREEDY)  # still usable
    assert [o.output_token_ids for o in again] == [hf_greedy(checkpoint, p, 4) for p in good]


def test_a_call_failing_midway_aborts_what_it_queued(checkpoint, engines, monkeypatch):
    llm = engines(checkpoint, max_waiting=2, max_num_seqs=2)
    real_step, calls = llm.engine.step, []

    def failing_step(timeout_s: float = 0.01):
        calls.append(timeout_s)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C while requests are in flight
        return real_step(timeout_s)

    monkeypatch.setattr(llm.engine, "step", failing_step)
    batch = prompts(23, [5, 9, 3, 12, 7])
    with pytest.raises(KeyboardInterrupt):
        llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert not llm.engine.has_unfinished_requests()
    assert_all_free(llm)
    again = llm.generate(batch[:3], GREEDY)
    assert [o.output_token_ids for o in again] == [hf_greedy(checkpoint, p, 4) for p in batch[:3]]

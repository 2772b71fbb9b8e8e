"""PrefillPacer: chunk caps from measured step times (no timing is measured here: the tests feed
step times in)."""

from __future__ import annotations

import pytest

from infinite_llm.control.pacer import PrefillPacer


def test_asks_for_a_decode_only_step_before_it_knows_the_reference():
    pacer = PrefillPacer(budget=512)
    assert pacer.next_cap(has_decodes=True, contended=True) == 0
    assert pacer.next_cap(has_decodes=False, contended=False) is None  # scheduler default


def test_cap_fits_the_allowed_slowdown():
    pacer = PrefillPacer(budget=512, slowdown=2.0, lone_slowdown=4.0)
    pacer.observe(0.010, prefill_tokens=0, num_decodes=4)  # decode-only: 10 ms
    pacer.observe(0.030, prefill_tokens=100, num_decodes=4)  # 0.2 ms per prompt token
    assert pacer.next_cap(has_decodes=True, contended=True) == 50  # 10 ms extra allowed
    assert pacer.next_cap(has_decodes=False, contended=False) is None  # alone: the whole budget


def test_a_prompt_alone_takes_the_whole_budget_however_costly_its_tokens():
    pacer = PrefillPacer(budget=512, lone_slowdown=4.0)
    pacer.observe(0.010, 0, 4)
    pacer.observe(1.010, 10, 0)  # 100 ms per token: nothing would fit in 30 ms
    assert pacer.next_cap(has_decodes=False, contended=False) is None
    assert pacer.next_cap(has_decodes=False, contended=True) == 0  # a waiting newcomer: paced


def test_a_prompt_alone_on_a_shared_instance_is_paced_and_never_crawls():
    """Other instances' requests wait on this one's steps (it holds their KV, or the prompt's KV
    is on holders): alone, its chunks fit lone_slowdown decode steps, at least budget / 16."""
    pacer = PrefillPacer(budget=512, lone_slowdown=4.0)
    pacer.observe(0.010, 0, 4)
    pacer.observe(0.030, 100, 0)  # 0.2 ms per prompt token
    assert pacer.next_cap(has_decodes=False, contended=False, shared=True) == 150  # 30 ms extra
    pacer.observe(1.010, 10, 0)  # 100 ms per token: nothing fits in 30 ms
    assert pacer.next_cap(has_decodes=False, contended=False, shared=True) == 512 // 16


def test_a_newcomer_calls_off_a_lone_step_only_if_the_rest_would_exceed_the_bound():
    pacer = PrefillPacer(budget=512, lone_slowdown=4.0)
    assert pacer.interrupts(elapsed_s=0.001, fraction_done=0.5)  # no decode step measured yet
    pacer.observe(0.010, 0, 4)  # a decode-only step: 10 ms, so a newcomer may wait 30 ms
    assert pacer.interrupts(elapsed_s=0.040, fraction_done=0.5)  # 40 ms left
    assert not pacer.interrupts(elapsed_s=0.020, fraction_done=0.5)  # 20 ms left
    assert not pacer.interrupts(elapsed_s=0.180, fraction_done=0.9)  # 20 ms left of a long step
    assert pacer.interrupts(elapsed_s=0.450, fraction_done=0.9)  # 50 ms left


def test_costlier_tokens_shrink_the_cap_at_once_and_it_grows_back_slowly():
    pacer = PrefillPacer(budget=512)
    pacer.observe(0.010, 0, 4)
    pacer.observe(0.020, 100, 4)
    assert pacer.next_cap(True, True) == 100
    pacer.observe(0.110, 100, 4)  # 1 ms per token now
    assert pacer.next_cap(True, True) == 10
    pacer.observe(0.020, 100, 4)
    assert 10 < pacer.next_cap(True, True) < 100


def test_a_prompt_too_costly_for_one_token_is_slowed_not_starved():
    pacer = PrefillPacer(budget=512, min_progress_every=4, probe_every=10**6)
    pacer.observe(0.010, 0, 4)
    pacer.observe(1.010, 10, 4)  # 100 ms per token: nothing fits in 10 ms
    caps = [pacer.next_cap(True, True) for _ in range(8)]
    assert caps == [0, 0, 0, 1, 0, 0, 0, 1]


def test_reference_is_measured_again_after_a_while():
    pacer = PrefillPacer(budget=512, probe_every=3)
    pacer.observe(0.010, 0, 4)
    for _ in range(3):
        pacer.observe(0.020, 10, 4)
    assert pacer.next_cap(True, True) == 0


def test_rejects_slowdowns_that_allow_nothing():
    with pytest.raises(ValueError):
        PrefillPacer(budget=512, slowdown=1.0)

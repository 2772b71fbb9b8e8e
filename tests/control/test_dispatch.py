"""The router's dispatch rule (shared by cluster/router.py and the simulator)."""

from __future__ import annotations

import pytest

from infinite_llm.control.dispatch import Dispatcher, NoLiveInstanceError
from infinite_llm.control.messages import InstanceLoad, InstanceStatus
from tests.control.cluster_harness import make_request as req


def _status(i: int, free: int, batch: int = 0, backlog: int = 0, received: int = 0,
            waiting_tokens: int = 0) -> InstanceStatus:
    load = InstanceLoad(batch_size=batch, num_waiting=1 if waiting_tokens else 0, waiting_tokens=waiting_tokens,
                        prefill_backlog_tokens=backlog, num_received=received)
    return InstanceStatus(i, 64, free, 0, 0, 0, load)


def test_most_free_blocks_then_fewest_requests_then_lowest_id():
    d = Dispatcher(3, block_size=4, step_tokens=64)
    d.update_view({0: _status(0, 10, batch=2), 1: _status(1, 10, batch=1), 2: _status(2, 5)})
    assert d.choose_home() == 1
    d.update_view({0: _status(0, 10), 1: _status(1, 10), 2: _status(2, 5)})
    assert d.choose_home() == 0


def test_a_burst_spreads_until_the_view_reports_it():
    d = Dispatcher(2, block_size=4, step_tokens=64)
    view = {0: _status(0, 20), 1: _status(1, 16)}
    d.update_view(view)
    homes = [d.dispatch(req(f"r{i}", 8)) for i in range(4)]  # 2 blocks each
    assert homes == [0, 0, 1, 0]
    d.update_view(view)  # unchanged statuses: what was sent still counts
    assert d.choose_home() == 1
    d.update_view({0: _status(0, 12), 1: _status(1, 14)})  # both reported since
    assert d.choose_home() == 1 and d.dispatch(req("pinned", 8), home=0) == 0


def test_dispatch_skips_dead_instances_and_fails_when_none_is_left():
    d = Dispatcher(3, block_size=8, step_tokens=64)
    d.update_view({
        0: InstanceStatus(0, 16, 16, 0, 0, 14, InstanceLoad(), state="dead"),
        1: InstanceStatus(1, 16, 2, 0, 0, 2, InstanceLoad()),
        2: InstanceStatus(2, 16, 8, 0, 0, 8, InstanceLoad()),
    })
    assert d.choose_home() == 2
    assert d.choose_home(exclude={2}) == 1
    with pytest.raises(NoLiveInstanceError):
        d.choose_home(exclude={1, 2})


def test_a_newcomer_avoids_an_instance_busy_with_a_long_prompt():
    d = Dispatcher(2, block_size=4, step_tokens=64)
    d.update_view({0: _status(0, 30, backlog=4000), 1: _status(1, 10)})
    assert d.choose_home(blocks_needed=2) == 1  # 0 has more room, but 62 steps of prompt queued
    # Less than a step of prompt work does not outweigh memory.
    d.update_view({0: _status(0, 30, backlog=63), 1: _status(1, 10)})
    assert d.choose_home(blocks_needed=2) == 0


def test_a_request_goes_where_its_prompt_fits_before_anything_else():
    d = Dispatcher(2, block_size=4, step_tokens=64)
    d.update_view({0: _status(0, 5), 1: _status(1, 40, backlog=4000)})
    assert d.choose_home(blocks_needed=3) == 0
    assert d.choose_home(blocks_needed=10) == 1  # waiting for memory at 0 would be worse
    assert d.choose_home(blocks_needed=50) == 0  # fits nowhere: the least prompt work queued first


def test_a_long_prompt_dispatched_counts_as_backlog_until_its_home_reports():
    d = Dispatcher(2, block_size=4, step_tokens=64)
    view = {0: _status(0, 64), 1: _status(1, 48)}
    d.update_view(view)
    assert d.dispatch(req("long", 160)) == 0  # 40 blocks: 0 still has the most room after it
    assert d.dispatch(req("short", 8)) == 1  # 0 has 160 tokens of prompt queued
    d.update_view({0: _status(0, 64), 1: _status(1, 48)})  # reports from before they took them in
    assert d.choose_home(blocks_needed=2) == 1
    d.update_view({0: _status(0, 24, received=1), 1: _status(1, 46, received=1)})  # 0 prefilled it
    assert d.choose_home(blocks_needed=2) == 1  # most room now
    d.update_view({0: _status(0, 48, received=1), 1: _status(1, 46, received=1)})
    assert d.choose_home(blocks_needed=2) == 0


def test_free_blocks_that_waiting_requests_will_take_do_not_count():
    # Instance 0 runs nothing and only its free blocks fit the newcomer (20 blocks), but its head
    # waits for blocks it lent out (it needs 40, 30 are free): the newcomer would wait behind
    # it. Seen in the simulator: the router kept sending requests to such an idle instance, as
    # the only one they "fit", while its queue grew to 500K tokens.
    d = Dispatcher(2, block_size=4, step_tokens=64)
    d.update_view({0: _status(0, 30, backlog=160, waiting_tokens=160), 1: _status(1, 10, batch=3)})
    assert d.choose_home(blocks_needed=20) == 1
    # Its waiting requests leave room for the newcomer: the prompt fits there, so it goes there.
    d.update_view({0: _status(0, 30, backlog=40, waiting_tokens=40), 1: _status(1, 10, batch=3)})
    assert d.choose_home(blocks_needed=20) == 0

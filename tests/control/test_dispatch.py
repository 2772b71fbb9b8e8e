"""The router's dispatch rule (shared by cluster/router.py and the simulator)."""

from __future__ import annotations

import pytest

from infinite_llm.control.dispatch import Dispatcher, NoLiveInstanceError
from infinite_llm.control.messages import InstanceLoad, InstanceStatus
from tests.control.cluster_harness import make_request as req


def _status(i: int, free: int, batch: int = 0) -> InstanceStatus:
    return InstanceStatus(i, 64, free, 0, 0, 0, InstanceLoad(batch_size=batch))


def test_most_free_blocks_then_fewest_requests_then_lowest_id():
    d = Dispatcher(3, block_size=4)
    d.update_view({0: _status(0, 10, batch=2), 1: _status(1, 10, batch=1), 2: _status(2, 5)})
    assert d.choose_home() == 1
    d.update_view({0: _status(0, 10), 1: _status(1, 10), 2: _status(2, 5)})
    assert d.choose_home() == 0


def test_a_burst_spreads_until_the_view_reports_it():
    d = Dispatcher(2, block_size=4)
    view = {0: _status(0, 20), 1: _status(1, 16)}
    d.update_view(view)
    homes = [d.dispatch(req(f"r{i}", 8)) for i in range(4)]  # 2 blocks each
    assert homes == [0, 0, 1, 0]
    d.update_view(view)  # unchanged statuses: what was sent still counts
    assert d.choose_home() == 1
    d.update_view({0: _status(0, 12), 1: _status(1, 14)})  # both reported since
    assert d.choose_home() == 1 and d.dispatch(req("pinned", 8), home=0) == 0


def test_dispatch_skips_dead_instances_and_fails_when_none_is_left():
    d = Dispatcher(3, block_size=8)
    d.update_view({
        0: InstanceStatus(0, 16, 16, 0, 0, 14, InstanceLoad(), state="dead"),
        1: InstanceStatus(1, 16, 2, 0, 0, 2, InstanceLoad()),
        2: InstanceStatus(2, 16, 8, 0, 0, 8, InstanceLoad()),
    })
    assert d.choose_home() == 2
    assert d.choose_home(exclude={2}) == 1
    with pytest.raises(NoLiveInstanceError):
        d.choose_home(exclude={1, 2})

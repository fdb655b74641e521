"""Messages' tensors: the header-cached codec writes what Flower writes and reads what Flower
writes; replies are pulled until all are in or the timeout passes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from rabo_flwr import exchange
from rabo_flwr.arrays import from_array, from_record, to_array, to_record
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent

TENSORS = [torch.randn(3, 4), torch.randn(5), torch.tensor(2.5), torch.randn(0, 3), torch.randn(4, 6).t(),
           torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.randn(2, 3).double(), torch.randn(3).half(),
           torch.tensor([True, False])]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{tuple(t.shape)}")
def test_arrays_hold_the_bytes_flower_writes_and_read_back_exactly(tensor):
    ours, flowers = to_array(tensor), Array(tensor.contiguous())
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    for array in (ours, flowers):
        back = from_array(array)
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)
        back.add_(1) if back.dtype != torch.bool else back.logical_not_()  # owns writable memory


def test_arrays_flower_wrote_another_way_are_read_through_flower():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.array_equal(from_array(Array(fortran)).numpy(), fortran)
    truncated = to_array(torch.ones(4))
    truncated.data = truncated.data[:-4]  # a header that promises more bytes than there are
    with pytest.raises(ValueError):
        from_array(truncated)


def test_a_real_model_round_trips_through_an_array_record():
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml")
    x, _ = cached_task(scenario).init_tensors(scenario.seed)
    record = to_record(x)
    assert record.object_id == ArrayRecord({k: v.contiguous() for k, v in x.items()}).object_id  # same content
    back = from_record(record)
    assert list(back) == list(x) and all(torch.equal(back[k], x[k]) for k in x)


class SlowGrid:
    """Replies become available ``delays[i]`` pulls after message i was pushed (None: never)."""

    def __init__(self, delays):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.ids = [None if d == "fail" else f"m{i}" for i, d in enumerate(self.delays)]
        return self.ids

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i, d in zip(self.ids, self.delays) if i in ids and d not in (None, "fail") and self.pulls > d]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_replies_are_pulled_until_all_arrived():
    grid = SlowGrid([0, 3, 7, "fail"])  # a push that failed has no id and is not waited for
    replies = exchange.send_and_receive(grid, [object()] * 4, timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 8  # stopped at the pull that brought the last one


def test_a_reply_that_never_comes_ends_the_wait_at_the_timeout():
    grid = SlowGrid([0, None])
    replies = exchange.send_and_receive(grid, [object()] * 2, timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls >= 2

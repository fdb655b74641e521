"""Push messages and pull their replies over a Flower ``Grid``, polling often enough for short phases.

Flower 1.42's ``Grid.send_and_receive`` pulls at a fixed interval: 0.1 s in simulation
(``InMemoryGrid``), 3 s in a deployment (the ServerApp's grid), so a reply waits on average
half of that after it arrived: 0.05 s per phase in simulation, 1.5 s in a deployment. Here
the interval starts at ``FIRST_POLL`` after each pull that brought replies and grows by half
after each empty one up to ``MAX_POLL``: a phase's last reply is seen within ``MAX_POLL`` of
arriving, and a long phase costs a pull every ``MAX_POLL`` (one small request).
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.002  # s
MAX_POLL = 0.05  # s


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages``; the replies that arrive within ``timeout`` seconds (as ``Grid.send_and_receive``)."""
    waiting = {m for m in grid.push_messages(messages) if m}  # an id is None where a push failed
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        interval = FIRST_POLL if pulled else min(1.5 * interval, MAX_POLL)
        time.sleep(min(interval, left))
    return replies

"""The leadership channel: latest-value broadcast with independent cursors."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_peers import LeadershipChannel
from trio_peers._cell import LeadershipCell


def make_cell() -> LeadershipCell:
    return LeadershipCell("default", "node-a", trio.current_time())


async def test_first_receive_is_the_current_state_at_once() -> None:
    cell = make_cell()
    cell.set(True, 7, trio.current_time())
    channel = cell.open_channel()
    with trio.testing.assert_checkpoints():
        first = await channel.receive()
    assert (first.is_leader, first.term, first.version) == (True, 7, 1)


async def test_every_receive_checkpoints() -> None:
    cell = make_cell()
    channel = cell.open_channel()
    await channel.receive()
    cell.set(True, 1, trio.current_time())
    with trio.testing.assert_checkpoints():
        await channel.receive()


async def test_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        LeadershipChannel(make_cell())  # type: ignore[call-arg]


async def test_same_state_is_not_a_change() -> None:
    cell = make_cell()
    assert not cell.set(False, None, 0.0)
    assert cell.set(True, 1, 0.0)
    assert not cell.set(True, 1, 0.0)
    assert cell.set(True, 2, 0.0)  # a new term is a change
    assert cell.value.version == 2


async def test_follower_state_never_carries_a_term() -> None:
    cell = make_cell()
    cell.set(False, 5, 0.0)
    assert cell.value.term is None


async def test_slow_consumer_gets_latest_not_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cell = make_cell()
    fast_seen: list[int] = []
    slow_seen: list[int] = []

    async def consume(channel: LeadershipChannel, seen: list[int], delay: float) -> None:
        async for change in channel:
            seen.append(change.version)
            await trio.sleep(delay)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, cell.open_channel(), fast_seen, 0)
        nursery.start_soon(consume, cell.open_channel(), slow_seen, 10)
        await trio.testing.wait_all_tasks_blocked()
        for i, leader in enumerate([True, False, True]):
            await trio.sleep(1)
            cell.set(leader, i + 1 if leader else None, trio.current_time())
        await trio.sleep(1)
        cell.close()
    assert fast_seen == [0, 1, 2, 3]
    assert slow_seen == [0, 3]


async def test_setting_never_blocks_with_stuck_consumers() -> None:
    cell = make_cell()
    channels = [cell.open_channel() for _ in range(100)]
    for channel in channels:
        await channel.receive()
    # Nobody reads; publishing many states is still immediate and O(1) memory.
    for i in range(10_000):
        cell.set(i % 2 == 0, i if i % 2 == 0 else None, 0.0)
    latest = await channels[0].receive()
    assert latest.version == cell.value.version == 10_000


async def test_close_ends_channels_after_the_last_unseen_state() -> None:
    cell = make_cell()
    channel = cell.open_channel()
    await channel.receive()
    cell.set(True, 3, 0.0)
    cell.set(False, None, 0.0)
    cell.close()
    last = await channel.receive()
    assert not last.is_leader
    with pytest.raises(trio.EndOfChannel):
        await channel.receive()
    # async for ends on its own
    assert [c async for c in cell.open_channel()] == [cell.value]


async def test_close_wakes_waiting_receivers() -> None:
    cell = make_cell()
    channel = cell.open_channel()
    await channel.receive()
    async with trio.open_nursery() as nursery:

        async def wait_end() -> None:
            with pytest.raises(trio.EndOfChannel):
                await channel.receive()

        nursery.start_soon(wait_end)
        await trio.testing.wait_all_tasks_blocked()
        cell.close()


async def test_aclose_affects_only_that_channel() -> None:
    cell = make_cell()
    a, b = cell.open_channel(), cell.open_channel()
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await a.receive()
    assert (await b.receive()).version == 0


async def test_aclose_wakes_a_receive_blocked_on_that_channel_only() -> None:
    """Regression: aclose() only set a flag, so a task already waiting in receive() on the
    channel stayed blocked until the next change of leadership, which may never come (trio's
    channels raise ClosedResourceError in such a receiver)."""
    cell = make_cell()
    a, b = cell.open_channel(), cell.open_channel()
    await a.receive()
    await b.receive()
    outcomes: dict[str, str] = {}

    async def reader(name: str, channel: LeadershipChannel) -> None:
        try:
            change = await channel.receive()
        except trio.ClosedResourceError:
            outcomes[name] = "closed"
        else:
            outcomes[name] = f"version {change.version}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "a", a)
        nursery.start_soon(reader, "b", b)
        await trio.testing.wait_all_tasks_blocked()
        await a.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == {"a": "closed"}  # b still waits, unaffected
        cell.set(True, 1, trio.current_time())
    assert outcomes == {"a": "closed", "b": "version 1"}


async def test_receive_nowait() -> None:
    cell = make_cell()
    channel = cell.open_channel()
    assert channel.receive_nowait().version == 0
    with pytest.raises(trio.WouldBlock):
        channel.receive_nowait()
    cell.set(True, 1, 0.0)
    assert channel.receive_nowait().is_leader
    cell.close()
    with pytest.raises(trio.EndOfChannel):
        channel.receive_nowait()

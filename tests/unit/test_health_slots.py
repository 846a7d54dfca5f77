"""`CheckSlots`, the checker's one cap on checks in flight: tasks waiting are served in order
and first, the batch (never waiting) is told when a slot is free, and a task cancelled while
waiting loses no slot."""

from __future__ import annotations

import threading

import anyio
import pytest

from labelproxy.health.slots import CheckSlots

pytestmark = pytest.mark.anyio


async def taker(slots: CheckSlots, got: list[str], name: str) -> None:
    """A probe task: waits for a slot, then says it got one."""
    await slots.take()
    got.append(name)


async def test_a_slot_given_back_goes_to_the_first_task_waiting_before_the_batch() -> None:
    slots = CheckSlots(1)
    assert slots.try_take()
    got: list[str] = []
    told: list[str] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(taker, slots, got, "a")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(taker, slots, got, "b")
        await anyio.wait_all_tasks_blocked()
        assert not slots.try_take()  # the batch finds none...
        slots.notify(lambda: told.append("batch"))  # ...and asks to be told
        slots.give()  # from the batch's own check: to "a", not back to the batch
        await anyio.wait_all_tasks_blocked()
        assert got == ["a"] and told == [] and not slots.try_take()
        threading.Thread(target=slots.give).start()  # another thread: to "b"
        with anyio.fail_after(5):
            while got != ["a", "b"]:
                await anyio.sleep(0.01)
    assert told == []
    slots.give()  # nobody waits now: free again, and the batch is told
    assert told == ["batch"] and slots.try_take() and slots.in_use == 1


async def test_a_task_cancelled_while_waiting_leaves_the_line() -> None:
    slots = CheckSlots(1)
    assert slots.try_take()
    got: list[str] = []

    async with anyio.create_task_group() as waiting:
        waiting.start_soon(taker, slots, got, "cancelled")
        await anyio.wait_all_tasks_blocked()
        waiting.cancel_scope.cancel()
    slots.give()  # nobody in line any more: free again
    assert got == [] and slots.in_use == 0 and slots.try_take()


async def test_a_cancelled_task_handed_a_slot_gives_it_to_the_next() -> None:
    slots = CheckSlots(1)
    assert slots.try_take()
    got: list[str] = []

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as first:
            first.start_soon(taker, slots, got, "first")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(taker, slots, got, "second")
            await anyio.wait_all_tasks_blocked()
            slots.give()  # handed to "first", which is cancelled before it wakes
            first.cancel_scope.cancel()
        with anyio.fail_after(5):
            while got != ["second"]:
                await anyio.sleep(0.01)
    assert slots.in_use == 1


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="a cap of 0 checks in flight"):
        CheckSlots(0)

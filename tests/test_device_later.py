"""``Device.later``: work deferred to a bubble of the device thread (a deferred snapshot
runs while the device waits for a neighbour, not before the next step's first job)."""

from __future__ import annotations

import threading

import pytest

from shardline.models._device import Device

pytestmark = pytest.mark.timeout(30)


def device() -> Device:
    return Device("t", "token", None, send_timeout=1.0)


def test_a_later_job_runs_in_a_bubble_before_the_awaited_input_arrives() -> None:
    dev = device()
    order: list[str] = []
    ran = threading.Event()
    done = threading.Event()
    try:
        def waiter() -> None:
            got = dev.take((1, "x", 0, 0), waiter)
            if got is None:
                order.append("parked")
                return
            order.append(f"input {got[0]}")
            done.set()

        def deferred() -> None:
            order.append("later")
            ran.set()

        def start() -> None:
            dev.later(deferred)
            waiter()

        dev.submit(start)
        assert ran.wait(5)
        dev.deliver((1, "x", 0, 0), 7)
        assert done.wait(5)
        assert order == ["parked", "later", "input 7"]
    finally:
        dev.close()


def test_ready_jobs_go_first_and_an_idle_device_runs_later_jobs_anyway() -> None:
    dev = device()
    order: list[str] = []
    ran = threading.Event()
    try:
        def deferred() -> None:
            order.append("later")
            ran.set()

        def start() -> None:
            dev.later(deferred)
            dev.submit(lambda: order.append("job"))

        dev.submit(start)
        assert ran.wait(5)  # nothing parked: it runs once the device is idle
        assert order == ["job", "later"]
    finally:
        dev.close()


def test_run_later_runs_them_now_in_order() -> None:
    dev = device()
    order: list[str] = []
    done = threading.Event()
    try:
        def start() -> None:
            dev.later(lambda: order.append("a"))
            dev.later(lambda: order.append("b"))
            dev.run_later()
            order.append("after")
            done.set()

        dev.submit(start)
        assert done.wait(5)
        assert order == ["a", "b", "after"]
    finally:
        dev.close()

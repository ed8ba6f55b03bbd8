"""A device's own thread, and the direct links that carry activations between devices.

Each stage actor owns one ``Device``: a thread that runs its torch work in order, and a
ZeroMQ PULL socket that thread reads itself. Activations and gradients go from one
device thread straight to the next one's socket; the event loops of the two nodes are
not on the way. Going through them costs four thread wake-ups per hop (device -> loop
-> ZeroMQ, ZeroMQ -> loop -> device), and on small VMs a wake-up costs 0.1-0.3 ms:
with 1F1B two hops sit on the critical path of every microbatch.

The node's event loop keeps the control plane (steps, errors, heartbeats), so a long
forward never delays a heartbeat, and a lost peer still fails the step through it.

A device in another process of the same host gets large activations through pooled
shared-memory segments instead of the socket: the receiving process also listens for
them at a name derived from its link address (``Exchange.listen_at``). With a
``wire_dtype``, floating tensors bound for another process are compressed on the way
(``shardline._wire_dtype``) and restored by the receiving codec.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from .._errors import NodeLost
from .._wire_dtype import check_wire_dtype, pack
from ..transport._address import parse_tcp, split_key, with_key
from ..transport._codec import Codec
from ..transport._endpoint import Endpoint
from ..transport._exchange import Link, exchange, poll_exchange
from ..transport._placement import discard, message_size
from ._tree import map_tensors

__all__ = ["Device", "Key"]

log = logging.getLogger("shardline.models")

# (step, "F" | "B", stage, microbatch): what a message is for.
Key = tuple[int, str, int, int]

# Devices of this process by link address: a send to one of them hands over the
# tensors by reference instead of through a socket.
_LOCAL: dict[str, Device] = {}
_NOBLOCK = int(zmq.NOBLOCK)
# How long a device with nothing at all to do waits for work before it runs its
# ``later`` jobs anyway: long enough for the next step's first job to arrive after a
# commit (so the deferred work falls in that step's bubbles), short enough that whoever
# waits for it is not kept long.
LATER_IDLE_S = 0.005
# Inputs held for a step this many step ids older than the newest seen are dropped: no
# step waits that long for one (a decode step takes the tokens run ahead for it within
# a few steps), so what is left is a step that never came (its requests stopped).
STALE_STEPS = 4096


class Device:
    """A thread for one device's torch work plus the inbox it fills from its link.

    ``submit(job)`` runs ``job`` on the thread (jobs run one at a time, in order).
    ``deliver(key, value)`` files an input; a job that found ``key`` missing (``take``)
    is queued again when it arrives.
    """

    def __init__(self, name: str, token: str, endpoint: Endpoint | None,
                 send_timeout: float, idle: Callable[[], None] | None = None,
                 wire_dtype: str | None = None) -> None:
        self.name = name
        self._wire_dtype = check_wire_dtype(wire_dtype)
        self._idle = idle  # runs on the thread about once a second while it has no work
        self._token = token
        self._send_timeout_ms = max(1, int(send_timeout * 1000))
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[], None]] = deque()
        self._later: deque[Callable[[], None]] = deque()  # device thread only
        self._inbox: dict[Key, Any] = {}
        self._parked: dict[Key, Callable[[], None]] = {}
        self._finished: set[int] = set()
        self._finished_order: deque[int] = deque()
        self._newest = 0  # the newest step an input arrived for
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._endpoint = endpoint
        # A codec of its own: one is not safe to share with the event loop's thread.
        self._codec = Codec(max_header_size=endpoint.limits.max_header_size
                            if endpoint is not None else 16 << 20,
                            max_frame_size=endpoint.limits.max_frame_size
                            if endpoint is not None else 1 << 30)
        self._outlets: dict[str, tuple[zmq.Socket[Any], Link | None]] = {}
        self._sock: zmq.Socket[Any] | None = None
        self.address = f"local://{uuid.uuid4().hex}"
        self._shm_at: str | None = None  # the link address shared memory listens at
        if endpoint is not None and endpoint.address is not None:
            self._sock, self.address = _bind_inlet(endpoint)
            plain = split_key(self.address)[0]
            if self._codec.shm_min_bytes is not None and exchange().listen_at(plain):
                self._shm_at = plain
        _LOCAL[self.address] = self
        self._thread = threading.Thread(target=self._main, name=f"shardline-{name}",
                                        daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.append(job)
        self._wake()

    def deliver(self, key: Key, value: Any) -> None:
        with self._lock:
            if key[0] in self._finished:
                return  # a late message for a step that failed or finished
            self._inbox[key] = (value, time.time())
            if key[0] > self._newest:
                self._newest = key[0]
                if len(self._inbox) > 64:  # a step's usual few inputs are not worth a scan
                    self._drop_stale()
            job = self._parked.pop(key, None)
            if job is not None:
                self._jobs.append(job)
        if job is not None and threading.current_thread() is not self._thread:
            self._wake()

    def finish(self, step: int) -> None:
        """``step`` is over: drop its leftovers and whatever still arrives for it."""
        with self._lock:
            self._finished.add(step)
            self._finished_order.append(step)
            if len(self._finished_order) > 4096:
                self._finished.discard(self._finished_order.popleft())
            for key in [k for k in self._inbox if k[0] == step]:
                del self._inbox[key]
            for key in [k for k in self._parked if k[0] == step]:
                del self._parked[key]

    def _drop_stale(self) -> None:
        """(Under the lock.) Drop inputs of steps far older than the newest."""
        oldest = self._newest - STALE_STEPS
        for key in [k for k in self._inbox if k[0] < oldest]:
            del self._inbox[key]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after its current job (blocking: call it off the loop)."""
        self._closed = True
        self._wake()
        self._thread.join(timeout)
        _LOCAL.pop(self.address, None)
        if self._shm_at is not None:
            exchange().stop_listening_at(self._shm_at)

    # -- the device thread -------------------------------------------------------------

    def later(self, job: Callable[[], None]) -> None:
        """Device thread: run ``job`` in the next bubble (no job ready while one waits
        for an input), after ``LATER_IDLE_S`` with no work at all, or at ``run_later``,
        whichever comes first; before the jobs submitted after it, though, only what
        calls ``run_later`` first is sure to find it done."""
        self._later.append(job)

    def run_later(self) -> None:
        """Device thread: run the jobs ``later`` still holds, now."""
        while self._later:
            self._run(self._later.popleft())

    def take(self, key: Key, job: Callable[[], None]) -> tuple[Any, float] | None:
        """The input for ``key`` and when it arrived; ``None`` if it has not arrived
        yet, and then ``job`` runs again once it does."""
        with self._lock:
            if key in self._inbox:
                return self._inbox.pop(key)  # type: ignore[no-any-return]
            self._parked[key] = job
            return None

    def send(self, address: str, key: Key, value: Any) -> int:
        """Send an input to the device at ``address`` (same process: by reference).
        Returns the bytes it moved to another process (0 in process)."""
        local = _LOCAL.get(address)
        if local is not None:
            local.deliver(key, value)
            return 0
        outlet = self._outlets.get(address)
        if outlet is None:
            outlet = self._outlets[address] = self._connect(address)
        sock, link = outlet
        wire_dtype = self._wire_dtype
        if wire_dtype is not None:
            value = map_tensors(value, lambda t: pack(t, wire_dtype))
        step, kind, stage, mb = key
        frames = self._codec.encode({"t": self._token, "s": step, "k": kind, "st": stage,
                                     "mb": mb, "v": value}, "a stage input", link)
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            discard(frames)
            raise NodeLost(f"the link from {self.name} to {address} took no data for "
                           f"{self._send_timeout_ms / 1000} s") from None
        return message_size(frames)

    def _connect(self, address: str) -> tuple[zmq.Socket[Any], Link | None]:
        if self._endpoint is None:
            raise NodeLost(f"no device at {address} in this process, and this node has "
                           "no network endpoint to reach it")
        plain, key = split_key(address)
        sock: zmq.Socket[Any] = self._endpoint.context.socket(zmq.PUSH)
        self._endpoint.configure(sock)
        sock.setsockopt(zmq.SNDTIMEO, self._send_timeout_ms)
        # Copying a frame up to 1 MiB is cheaper than pyzmq's zero-copy bookkeeping,
        # which wakes its garbage-collector thread for every frame sent.
        sock.copy_threshold = 1 << 20
        self._endpoint.make_curve_client(sock, key)
        sock.connect(plain)
        link = None
        if self._codec.shm_min_bytes is not None:
            link = exchange().link_to_address(plain)
        return sock, link

    def _main(self) -> None:
        poller = zmq.Poller()
        if self._sock is not None:
            poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closed:
                self._receive()
                with self._lock:
                    job = self._jobs.popleft() if self._jobs else None
                    waiting = bool(self._parked)
                if job is not None:
                    self._run(job)
                    continue
                if self._later and waiting:
                    self._run(self._later.popleft())  # a bubble: nothing else can run
                    continue
                # The timeout bounds how long a lost wake-up could last, and paces
                # the idle housekeeping.
                timeout = round(LATER_IDLE_S * 1000) if self._later else 1000
                if not poller.poll(timeout):
                    if self._later:
                        self._run(self._later.popleft())
                        continue
                    poll_exchange()  # shared memory: releases, idle segments
                    if self._idle is not None:
                        try:
                            self._idle()
                        except Exception:
                            log.exception("housekeeping on device %s raised", self.name)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
        except zmq.ContextTerminated:
            # The node ended its ZeroMQ context while this device still ran (a stop
            # that gave up waiting): nothing is left to serve, and the sockets must
            # close for the node's term() to return.
            log.debug("device %s: context terminated", self.name)
        finally:
            for sock in [*(s for s, _ in self._outlets.values()), self._sock]:
                if sock is not None:
                    sock.close(linger=0)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except zmq.ContextTerminated:
            raise
        except Exception:
            log.exception("job on device %s raised", self.name)

    def _receive(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._accept(frames)
            except Exception as exc:  # a bad message is dropped, never fatal
                log.warning("device %s dropped a malformed message: %s", self.name, exc)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        assert self._endpoint is not None
        limits = self._endpoint.limits
        header = frames[0].bytes
        if len(header) > limits.max_header_size or len(frames) - 1 > limits.max_frames:
            raise ValueError("message over the node's limits")
        msg = self._codec.decode(header, [f.buffer for f in frames[1:]])
        if msg.get("t") != self._token:
            raise ValueError("message for another pipeline")
        key = (int(msg["s"]), str(msg["k"]), int(msg["st"]), int(msg["mb"]))
        self.deliver(key, msg.get("v"))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")


def _bind_inlet(endpoint: Endpoint) -> tuple[zmq.Socket[Any], str]:
    """A PULL socket on the interface the node listens on, with the node's security."""
    assert endpoint.address is not None
    sock = endpoint.context.socket(zmq.PULL)
    endpoint.configure(sock)
    endpoint.make_curve_server(sock)
    try:
        sock.bind(f"tcp://{endpoint.bind_host}:0")
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    _, port = parse_tcp(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    advertised, key = split_key(endpoint.address)
    host, _ = parse_tcp(advertised)
    host = host if ":" not in host else f"[{host}]"
    address = f"tcp://{host}:{port}"
    return sock, with_key(address, key)

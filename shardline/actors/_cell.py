"""One live actor: its mailbox, the worker task(s) draining it, and supervision.

The hot path is ``ask`` -> mailbox -> ``_worker`` -> future. It avoids a cancel
scope and a done-callback per message (each costs as much as the whole round trip);
a caller that gives up cancels the handler through the worker's asyncio task instead.

A message from the network for a plain (``def``) method skips the mailbox when a
worker would take it at once anyway: nothing queued before it, a worker free. It runs
right where it arrived, which saves the mailbox and a task switch (a third of a remote
round trip). Order and concurrency are those of the mailbox path.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import ActorError, ActorStopped, AskTimeout, MethodNotFound
from ._actor import Actor, MethodTable, method_table
from ._lifecycle import OnError, RestartPolicy, StopInfo, StopReason

if TYPE_CHECKING:
    from ._node import Node
    from ._ref import ActorRef

__all__ = ["ActorCell", "actor_error"]

log = logging.getLogger("shardline.actors")

# (method, args, kwargs, reply sink or None for a tell). The sink is an asyncio.Future
# for a local ask or a transport.Reply (same duck type) for one from the network.
Message = tuple[str, tuple[Any, ...], dict[str, Any], Any]


def actor_error(exc: BaseException, actor: str) -> ActorError:
    """Wrap an exception raised inside an actor as the ``ActorError`` its caller sees."""
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else (
        f"{cls.__module__}.{cls.__qualname__}")
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    err = ActorError(type_name, str(exc), tb, actor)
    err.__cause__ = exc
    return err


class ActorCell:
    """Runtime state of one actor on its node. Users hold an ``ActorRef`` instead."""

    def __init__(self, node: Node, ref: ActorRef, cls: type[Actor], args: tuple[Any, ...],
                 kwargs: dict[str, Any], *, mailbox_size: int, on_error: OnError,
                 policy: RestartPolicy, stop_timeout: float) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be >= 1, got {mailbox_size}")
        if on_error not in ("resume", "restart", "stop"):
            raise ValueError(f"on_error must be 'resume', 'restart' or 'stop', got {on_error!r}")
        concurrency = cls.max_concurrency
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"{cls.__qualname__}.max_concurrency must be an int >= 1")
        self.node = node
        self.ref = ref
        self.cls = cls
        self.label = ref.name or f"{cls.__qualname__}#{ref.actor_id}"
        self.messages_in = 0  # taken from the mailbox (asks and tells)
        self.replies = 0      # asks answered with a result
        self._args = args
        self._kwargs = kwargs
        self._on_error = on_error
        self._policy = policy
        self._stop_timeout = stop_timeout
        self._concurrency = concurrency
        self.methods: MethodTable = method_table(cls)
        self._send: MemoryObjectSendStream[Message]
        self._recv: MemoryObjectReceiveStream[Message]
        self._send, self._recv = anyio.create_memory_object_stream[Message](mailbox_size)
        self._loop = asyncio.get_running_loop()
        self._instance: Actor | None = None
        self._closing = False
        self._stop_info: StopInfo | None = None
        self._stopped = anyio.Event()
        self._scope = anyio.CancelScope()
        self._workers: set[asyncio.Task[Any]] = set()
        # future of the ask a worker is handling -> that worker; lets a caller that
        # gave up cancel exactly its own handler.
        self._running: dict[Any, asyncio.Task[Any]] = {}
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._overflow: deque[tuple[Message, Any]] = deque()
        # Idle workers wait on a future of their own, not in the mailbox's receive():
        # anyio's receive records the waiting task (get_current_task) every time, an
        # eighth of a busy scheduler's time. Whoever puts a message in wakes one.
        self._idle: deque[asyncio.Future[None]] = deque()
        self._queued = 0  # in the mailbox or handed to a worker that has not taken it yet
        self._busy = 0    # handlers running (an async one may be suspended)
        self._inline = on_error != "restart"  # a restart must happen before what follows

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Build the instance and run ``on_start``; raises ``ActorError`` if either fails."""
        try:
            self._instance = self._construct()
            await self._instance.on_start()
        except Exception as exc:
            self._send.close()
            self._recv.close()
            raise actor_error(exc, self.label) from exc

    def _construct(self) -> Actor:
        # __new__ then __init__ so ``self.ref`` / ``self.node`` work inside __init__.
        instance = self.cls.__new__(self.cls)
        instance._sl_ref = self.ref
        instance._sl_node = self.node
        instance.__init__(*self._args, **self._kwargs)  # type: ignore[misc]
        return instance

    async def run(self) -> None:
        """Drain the mailbox until stopped; owned by the node's task group."""
        try:
            with self._scope:
                if self._concurrency == 1:
                    await self._worker()
                else:
                    async with anyio.create_task_group() as tg:
                        for _ in range(self._concurrency):
                            tg.start_soon(self._worker)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        self._closing = True
        self._send.close()
        self._fail_queued()
        self._recv.close()
        reason = self._stop_info or StopInfo(StopReason.STOPPED)
        if reason.reason is StopReason.STOPPED and self._instance is not None:
            with anyio.move_on_after(self._stop_timeout) as scope:
                try:
                    await self._instance.on_stop()
                except Exception:
                    log.exception("on_stop of actor %s raised", self.label)
            if scope.cancelled_caught:
                log.error("on_stop of actor %s took over %.1f s; abandoned",
                          self.label, self._stop_timeout)
        self._stop_info = reason
        self._stopped.set()  # waiters resume later, after the node has forgotten the cell
        self.node._forget(self)

    def _fail_queued(self) -> None:
        while True:
            try:
                _, _, _, fut = self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if fut is not None and not fut.done():
                fut.set_exception(self._stopped_error())

    def request_stop(self, info: StopInfo | None = None) -> None:
        """Refuse new messages, fail queued ones; the current message still completes."""
        if self._stop_info is None and info is not None:
            self._stop_info = info
        if not self._closing:
            self._closing = True
            # Closing the last send half ends the workers' loops (EndOfStream) once the
            # mailbox is empty; idle ones look again now.
            self._send.close()
            self._wake_all()

    def cancel(self) -> None:
        """Stop now, interrupting the message in progress (node shutdown past its grace)."""
        self.request_stop()
        self._scope.cancel()

    async def stop(self) -> None:
        self.request_stop()
        if asyncio.current_task() in self._workers:
            return  # an actor stopping itself must not wait for its own handler
        await self._stopped.wait()

    async def wait_stopped(self) -> StopInfo:
        await self._stopped.wait()
        assert self._stop_info is not None
        return self._stop_info

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def stop_info(self) -> StopInfo | None:
        """Why the actor stopped, once it has."""
        return self._stop_info if self._stopped.is_set() else None

    def statistics(self) -> dict[str, Any]:
        stats = self._recv.statistics()
        return {
            "name": self.ref.name,
            "id": self.ref.actor_id,
            "class": self.cls.__qualname__,
            "mailbox_used": stats.current_buffer_used,
            "mailbox_size": stats.max_buffer_size,
            "senders_waiting": stats.tasks_waiting_send,
            "running": len(self._running),
            "restarts": self._policy.restarts,
            "messages_in": self.messages_in,
            "replies": self.replies,
            "overflow": len(self._overflow),
        }

    def _stopped_error(self) -> ActorStopped:
        return ActorStopped(f"actor {self.label} has stopped")

    # -- the message path ----------------------------------------------------------

    def _check(self, method: str) -> None:
        if self._closing:
            raise self._stopped_error()
        if method not in self.methods:
            raise MethodNotFound(
                f"actor {self.label} ({self.cls.__qualname__}) has no public method {method!r}")

    async def _enqueue(self, msg: Message, timeout: float | None) -> None:
        self._queued += 1
        try:
            self._send.send_nowait(msg)
            self._wake_one()
            return
        except anyio.WouldBlock:
            pass
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._queued -= 1
            raise self._stopped_error() from None
        # Mailbox full: wait for space (backpressure), within the ask's deadline.
        try:
            with anyio.fail_after(timeout):
                await self._send.send(msg)
            self._wake_one()
        except TimeoutError:
            self._queued -= 1
            raise AskTimeout(
                f"ask {msg[0]!r} to actor {self.label}: mailbox still full after {timeout} s"
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._queued -= 1
            raise self._stopped_error() from None
        except BaseException:
            self._queued -= 1
            raise

    async def ask(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                  timeout: float | None) -> Any:
        self._check(method)
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        metrics = self.node.metrics
        if metrics is not None:
            metrics.time_ask(fut)
        if timeout is not None:
            deadline = loop.time() + timeout
        await self._enqueue((method, args, kwargs, fut), timeout)
        if timeout is None:
            try:
                return await fut
            except asyncio.CancelledError:
                self.abandon(fut)
                raise
        handle = loop.call_at(deadline, self._expire, fut, method, timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            self.abandon(fut)
            raise
        finally:
            handle.cancel()

    async def tell(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._check(method)
        await self._enqueue((method, args, kwargs, None), None)

    def deliver(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                reply: Any, ack: Any) -> None:
        """Enqueue a message that arrived from the network, without awaiting.

        ``reply`` (a ``transport.Reply``) gets the result of an ask; ``ack`` is answered
        once a tell is in the mailbox. When the mailbox is full, messages wait in an
        order-preserving overflow; it stays small because remote senders stop at their
        window of unacknowledged tells, and each waiting ask has a caller awaiting it.
        """
        self._check(method)
        if not self._queued and not self._overflow and self._busy < self._concurrency \
                and self._inline:
            fn, is_async = self.methods[method]
            if not is_async:
                self._run_inline(fn, method, args, kwargs, reply, ack)
                return
        msg: Message = (method, args, kwargs, reply)
        self._queued += 1
        if not self._overflow:
            try:
                self._send.send_nowait(msg)
            except anyio.WouldBlock:
                pass
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._queued -= 1
                raise self._stopped_error() from None
            else:
                self._wake_one()
                if ack is not None:
                    ack.set_result(None)
                return
        self._overflow.append((msg, ack))
        if len(self._overflow) == 1:
            self.node._start_task(self._drain_overflow)

    def _run_inline(self, fn: Any, method: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any], reply: Any, ack: Any) -> None:
        """A plain method, run where its message arrived (see the module docstring)."""
        self.messages_in += 1
        if ack is not None:
            ack.set_result(None)
        try:
            result = fn(self._instance, *args, **kwargs)
        except Exception as exc:
            self._failed(exc, method, reply)
            return
        if reply is not None and not reply.done():
            reply.set_result(result)
            self.replies += 1

    async def _drain_overflow(self) -> None:
        overflow = self._overflow
        while overflow:
            msg, ack = overflow[0]
            try:
                await self._send.send(msg)
                self._wake_one()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                error = self._stopped_error()
                for msg, ack in overflow:
                    for sink in (msg[3], ack):
                        if sink is not None and not sink.done():
                            sink.set_exception(error)
                overflow.clear()
                return
            overflow.popleft()
            if ack is not None:
                ack.set_result(None)

    def _expire(self, fut: asyncio.Future[Any], method: str, timeout: float) -> None:
        if not fut.done():
            fut.set_exception(AskTimeout(
                f"ask {method!r} to actor {self.label} got no reply within {timeout} s"))
            self.abandon(fut)

    def abandon(self, fut: Any) -> None:
        """The caller gave up: cancel its handler if it is running right now.

        A queued message is skipped by the worker when it sees the future is done.
        """
        task = self._running.get(fut)
        if task is not None and task not in self._abandoned:
            self._abandoned.add(task)
            task.cancel()

    def _wake_one(self) -> None:
        """A message is in the mailbox: an idle worker takes it (a worker that finishes
        a message first may take it instead: the woken one then waits again)."""
        idle = self._idle
        while idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._idle:
            self._wake_one()

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._workers.add(task)
        recv = self._recv
        methods = self.methods
        running = self._running
        loop = self._loop
        try:
            while True:
                try:
                    msg = recv.receive_nowait()
                except anyio.WouldBlock:
                    # Idle: keep nothing of the last message alive meanwhile (its tensors
                    # may be shared memory that their sender waits to reuse).
                    msg = args = kwargs = result = None  # type: ignore[assignment]
                    wake: asyncio.Future[None] = loop.create_future()
                    self._idle.append(wake)
                    try:
                        await wake
                    finally:
                        wake.cancel()  # cancelled while idle: no wake-up is lost on it
                    continue
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                method, args, kwargs, fut = msg
                self._queued -= 1
                self.messages_in += 1
                if fut is not None:
                    if fut.done():
                        continue  # the caller timed out or was cancelled while queued
                    if self._closing:
                        fut.set_exception(self._stopped_error())
                        continue
                elif self._closing:
                    continue
                fn, is_async = methods[method]
                if fut is not None:
                    running[fut] = task
                self._busy += 1
                try:
                    result = fn(self._instance, *args, **kwargs)
                    if is_async:
                        result = await result
                except asyncio.CancelledError:
                    if task not in self._abandoned:
                        raise
                    self._abandoned.discard(task)
                    uncancel = getattr(task, "uncancel", None)
                    if uncancel is not None:
                        uncancel()
                    continue
                except Exception as exc:
                    self._failed(exc, method, fut)
                    if self._on_error == "restart" and not self._closing:
                        await self._restart(exc)
                    continue
                finally:
                    self._busy -= 1
                    if fut is not None:
                        del running[fut]
                    # A cancel that raced with the handler finishing must not leak
                    # into the next message.
                    self._abandoned.discard(task)
                if fut is not None and not fut.done():
                    fut.set_result(result)
                    self.replies += 1
        finally:
            self._workers.discard(task)

    def _failed(self, exc: Exception, method: str, fut: asyncio.Future[Any] | None) -> None:
        if fut is not None:
            if not fut.done():
                fut.set_exception(actor_error(exc, self.label))
        else:
            log.error("tell %r to actor %s raised", method, self.label, exc_info=exc)
        if self._on_error == "stop":
            self.request_stop(StopInfo(StopReason.FAILED, _describe(exc)))

    async def _restart(self, exc: BaseException) -> None:
        while True:
            if not self._policy.allow_restart():
                log.error("actor %s failed %d times within %.1f s; stopping",
                          self.label, self._policy.max_restarts + 1, self._policy.within)
                self.request_stop(StopInfo(StopReason.RESTARTS_EXHAUSTED, _describe(exc)))
                return
            log.warning("actor %s restarting after %s", self.label, _describe(exc))
            try:
                self._instance = self._construct()
                await self._instance.on_start()
                return
            except Exception as again:
                exc = again


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__qualname__}: {exc}"

"""One Redis consumer-group mechanism: the daemon's ingress and the trainer's label intake run on it.

A `StreamConsumer` reads `stream` as consumer `consumer` of `group` and hands chunks of entries to
a handler, which processes them and calls `commit` to write its results and acknowledge the chunk
in one MULTI/EXEC. Delivery is at-least-once: an entry is pending from the read to that commit.

- Start and every (re)connect: the group is created from "0" with MKSTREAM if missing (also after
  the stream was deleted under us: NOGROUP), this consumer's own pending entries are finished first
  ("0" cursor), then idle entries of other consumers are claimed with XAUTOCLAIM until its cursor
  comes back 0-0 (again every claim_idle/2), then new entries (">").
- Entries in flight here (read, not yet acknowledged) have their idle time reset every claim_idle/3
  (XCLAIM <ids> JUSTID to ourselves: no delivery count), so a live consumer never has them claimed
  by another one however long they wait in the batcher's queue.
- In flight is bounded by entries (`max_inflight`) and by bytes (`max_inflight_bytes`): reads shrink
  COUNT to what the byte budget leaves, from the largest entry of the last read.
- Errors: Redis away (connection, timeout, LOADING) -> reconnect with backoff, logged; a commit that
  Redis refuses (OOM, NOPERM, READONLY, MISCONF) -> no new reads, the same commit is retried with
  backoff, `up` is False with the reason, and nothing is lost; WRONGTYPE, NOAUTH/WRONGPASS, NOPERM on
  reading and any other error -> `StreamError` with a one-line reason, which the supervisor turns
  into exit 1 (systemd restarts the process).
- Consumers: the name is stable (the hostname by default), so a restarted process finds its own
  pending entries at once. On a clean exit the consumer deletes itself from the group if it has no
  pending entries; consumers with no pending entries idle longer than `dead_consumer_idle_ms` are
  deleted at start and periodically. Both deletions are atomic (a Lua script checks "no pending").
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rx

from filterd.config import redact_url
from filterd.errors import FilterdError

log = logging.getLogger("filterd.net.streams")

Entry = tuple[bytes, dict[bytes, bytes]]
Handler = Callable[[list[Entry]], Awaitable[None]]

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
HINT_MEMORY_S = 60.0  # a large entry keeps reads small this long
SHUTDOWN_GRACE_S = 10.0  # how long a stopping consumer keeps retrying a refused commit before leaving it pending

# Delete a consumer only if it has no pending entries, atomically (its pending entries would be lost).
_DEL_IF_IDLE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
"""


class StreamError(FilterdError):
    """A Redis error that retrying will not fix (wrong type, wrong password, no permission to read)."""


class StreamObserver(Protocol):
    """Metrics hooks (FilterdMetrics and TrainerMetrics implement them)."""

    def on_stream_up(self, name: str, up: bool) -> None: ...
    def on_stream_stats(self, stream: str, group: str, backlog: int, pending: int) -> None: ...
    def on_redis_error(self, op: str, error: str) -> None: ...


@dataclass(frozen=True)
class StreamSettings:
    url: str
    stream: str
    group: str
    consumer: str
    name: str = "redis"  # in logs and as the `ingress` label of filterd_ingress_up
    count: int = 64
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    max_inflight: int = 512
    max_inflight_bytes: int = 64 << 20
    dead_consumer_idle_ms: int = 3_600_000
    stats_every_s: float = 5.0

    @classmethod
    def from_config(
        cls, rc: Any, *, stream: str, group: str, name: str, consumer: str | None = None, **kw: Any
    ) -> "StreamSettings":
        """From a RedisConfig ([redis] keys); keyword arguments override."""
        base = dict(
            url=rc.url, stream=stream, group=group, consumer=consumer or rc.consumer_name(), name=name,
            count=rc.count, block_ms=rc.block_ms, claim_idle_ms=rc.claim_idle_ms, max_inflight=rc.max_inflight,
            max_inflight_bytes=rc.max_inflight_bytes, dead_consumer_idle_ms=int(rc.dead_consumer_idle * 1000),
        )  # fmt: skip
        return cls(**(base | kw))


# -- error classes ------------------------------------------------------------------------------
_CODE = re.compile(r"\b(WRONGTYPE|NOGROUP|NOPERM|NOAUTH|WRONGPASS|OOM|READONLY|MISCONF|EXECABORT|LOADING|BUSYGROUP|UNBLOCKED)\b")
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)


def error_code(e: BaseException) -> str:
    """A short, fixed-vocabulary name for an error (a metric label, never an exception message)."""
    if isinstance(e, rx.AuthenticationError):
        return "auth"
    if isinstance(e, rx.NoPermissionError):
        return "noperm"
    if isinstance(e, rx.OutOfMemoryError):
        return "oom"
    if isinstance(e, rx.ReadOnlyError):
        return "readonly"
    if isinstance(e, rx.BusyLoadingError):
        return "loading"
    if isinstance(e, (rx.ConnectionError, rx.TimeoutError, ConnectionError, OSError)):
        return "connection"
    m = _CODE.search(str(e))
    if m:
        return {"NOAUTH": "auth", "WRONGPASS": "auth"}.get(m.group(1), m.group(1).lower())
    return "other"


def error_kind(e: BaseException, op: str) -> str:
    """transient (retry, reconnect) | nogroup (recreate) | refused (a write refused: retry, unhealthy) | fatal."""
    code = error_code(e)
    if code in ("connection", "loading"):
        return "transient"
    if code in ("nogroup", "unblocked"):  # UNBLOCKED: the stream was deleted while we were blocked on it
        return "nogroup"
    if code == "readonly":  # a failover in progress: the replica becomes a primary or we get redirected
        return "refused" if op == "write" else "transient"
    if op == "write" and code in ("oom", "noperm", "misconf", "execabort"):
        return "refused"
    if op == "read" and code in ("oom", "misconf"):  # XGROUP CREATE refused: same as a refused write
        return "refused"
    return "fatal"


def one_line(e: BaseException, limit: int = 200) -> str:
    """The error on one line, without the payload redis-py quotes for a failed pipeline command (its name and
    key are kept: `XADD filterd:out: this user has no permissions ...`)."""
    raw = str(e)
    cmd = re.match(r"^Command # \d+ \((\S+) (\S+)", raw)
    text = _PIPELINE_PREFIX.sub("", raw).strip("()',\" ")
    text = " ".join(text.split())
    if cmd:
        text = f"{cmd.group(1)} {cmd.group(2)}: {text}"
    return (text[:limit] + "...") if len(text) > limit else (text or type(e).__name__)


def entry_bytes(fields: dict[bytes, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def without_large_fields(fields: dict[bytes, bytes], limit: int) -> dict[bytes, bytes]:
    """A dead letter keeps every field, but a value over `limit` bytes becomes `<name>_bytes=<size>`."""
    out: dict[bytes, bytes] = {}
    for k, v in fields.items():
        if len(v) > limit:
            out[k + b"_bytes"] = str(len(v)).encode()
        else:
            out[k] = v
    return out


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, returning early when `stop` is set (backoff that does not delay shutdown)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


def _entries(reply: Any) -> list[Entry]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return next(iter(reply.values()))[0] if reply else []
    return reply[0][1]


# -- the consumer ------------------------------------------------------------------------------
class StreamConsumer:
    """See the module docstring. `run(stop)` serves until stop; `drain_once(timeout)` takes what waits now."""

    def __init__(self, settings: StreamSettings, handler: Handler, observer: StreamObserver | None = None) -> None:
        self.s = settings
        self.handler = handler
        self.observer = observer
        self.client: aioredis.Redis | None = None
        self.up = False
        self.reason = "not connected"
        self.max_chunk_bytes = 0  # largest chunk handed to the handler (for tests and the bench)
        self._inflight: dict[bytes, int] = {}  # entry id -> bytes, from read to commit
        self._inflight_bytes = 0
        self._entry_hint = 0  # largest entry lately (0: none seen yet): sizes the next read's COUNT
        self._hint_at = 0.0
        self._room = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        self._fatal: BaseException | None = None
        self._refused: str | None = None  # why Redis refuses our commits, while it does
        self._write_lost = False  # a commit failed for want of a connection, until one goes through
        self._stopping_since: float | None = None
        self._drain = False
        self._drain_deadline = 0.0
        self._read_delivered = 0

    # -- state ----------------------------------------------------------------------------------
    def _set_up(self, up: bool, reason: str = "ok") -> None:
        if self._refused is not None:
            up, reason = False, f"writing to redis refused: {self._refused}"
        changed = up != self.up
        self.up, self.reason = up, reason
        if changed and self.observer is not None:
            self.observer.on_stream_up(self.s.name, up)

    def _count_error(self, op: str, e: BaseException) -> None:
        if self.observer is not None:
            self.observer.on_redis_error(op, error_code(e))

    def _connect(self) -> aioredis.Redis:
        timeout = max(5.0, self.s.block_ms / 1000 + 5)
        return aioredis.from_url(self.s.url, socket_timeout=timeout, socket_connect_timeout=5.0)

    def _fatal_error(self, e: BaseException, what: str) -> StreamError:
        return StreamError(f"{self.s.name}: {what} {self.s.stream} at {redact_url(self.s.url)}: {one_line(e)}")

    # -- serving --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish what is in flight; raises StreamError on a fatal error."""
        self.client = self._connect()
        keeper: asyncio.Task | None = None
        backoff = BACKOFF_MIN_S
        try:
            while not stop.is_set():
                try:
                    await self._ensure_group()
                    if keeper is None:
                        keeper = asyncio.create_task(self._keep(stop), name=f"{self.s.name}-keeper")
                    self._set_up(True)
                    log.info("%s: reading %s as %s/%s at %s", self.s.name, self.s.stream, self.s.group, self.s.consumer,
                             redact_url(self.s.url))  # fmt: skip
                    backoff = BACKOFF_MIN_S
                    await self._serve(stop)
                except StreamError:
                    raise
                except Exception as e:
                    kind = error_kind(e, "read")
                    self._count_error("read", e)
                    if kind == "fatal":
                        raise self._fatal_error(e, "reading") from None
                    if kind == "nogroup":
                        log.warning("%s: stream %s or group %s is gone (%s); recreating", self.s.name, self.s.stream,
                                    self.s.group, one_line(e))  # fmt: skip
                        await sleep_or_stop(stop, BACKOFF_MIN_S)
                        continue
                    if kind == "transient":
                        log.warning("%s: connection lost (%s); reconnecting in %.1fs", self.s.name, one_line(e), backoff)
                        self._set_up(False, f"redis unreachable: {one_line(e)}")
                    else:
                        log.warning("%s: redis refuses (%s); retrying in %.1fs", self.s.name, one_line(e), backoff)
                        self._set_up(False, f"redis refuses: {one_line(e)}")
                    await sleep_or_stop(stop, backoff * (1 + random.random() / 2))
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self._stopping_since = time.monotonic()
            await self._wait_tasks()
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            if self._fatal is None:
                await self._leave_group()
            self._set_up(False, "stopped")
            await self.client.aclose()
        if self._fatal is not None:
            raise self._fatal

    async def _serve(self, stop: asyncio.Event) -> None:
        await self._own_pending(stop)
        next_claim = 0.0
        while not stop.is_set():
            self._raise_fatal()
            if not await self._wait_room(0.5):  # full, or commits refused: read nothing new
                continue
            if time.monotonic() >= next_claim:
                await self._claim_idle(stop)
                next_claim = time.monotonic() + max(self.s.claim_idle_ms / 2000, 0.05)
                continue
            assert self.client is not None
            reply = await self.client.xreadgroup(
                self.s.group, self.s.consumer, {self.s.stream: ">"}, count=self._count(), block=self.s.block_ms
            )
            await self._dispatch(_entries(reply))

    async def drain_once(self, timeout_s: float = 30.0) -> int:
        """Own pending, claimable idle and new entries, handled one chunk at a time until none is left or the
        deadline passes; returns how many entries were handed over. Errors are raised, not retried."""
        self._drain, self._drain_deadline = True, time.monotonic() + timeout_s
        self.client = self._connect()
        self._read_delivered = 0
        try:
            await self._ensure_group()
            stop = asyncio.Event()
            await self._own_pending(stop)
            await self._claim_idle(stop)
            while time.monotonic() < self._drain_deadline:
                reply = await self.client.xreadgroup(self.s.group, self.s.consumer, {self.s.stream: ">"}, count=self._count())
                entries = _entries(reply)
                if not entries:
                    break
                await self._dispatch(entries)
        finally:
            await self.client.aclose()
        return self._read_delivered

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _ensure_group(self) -> None:
        assert self.client is not None
        try:  # from "0": entries added before the group existed are processed, not skipped
            await self.client.xgroup_create(self.s.stream, self.s.group, id="0", mkstream=True)
            log.info("%s: created group %s on %s", self.s.name, self.s.group, self.s.stream)
        except rx.ResponseError as e:
            if "BUSYGROUP" in str(e):
                return
            if error_kind(e, "read") == "refused":  # OOM refuses XGROUP CREATE even when the group exists
                groups = await self.client.xinfo_groups(self.s.stream)
                if any(g["name"] in (self.s.group, self.s.group.encode()) for g in groups):
                    return
            raise

    async def _own_pending(self, stop: asyncio.Event) -> None:
        """Entries delivered to this consumer name before a crash or reconnect and never acknowledged."""
        assert self.client is not None
        cursor: bytes | str = "0"
        n = 0
        while not stop.is_set() and (not self._drain or time.monotonic() < self._drain_deadline):
            if not await self._room_or_stop(stop):
                break
            reply = await self.client.xreadgroup(self.s.group, self.s.consumer, {self.s.stream: cursor}, count=self._count())
            entries = _entries(reply)
            if not entries:
                break
            cursor = entries[-1][0]
            gone = [i for i, f in entries if not f]  # trimmed or deleted from the stream: nothing to process
            if gone:
                await self.client.xack(self.s.stream, self.s.group, *gone)
            fresh = [(i, f) for i, f in entries if f and i not in self._inflight]  # in flight: already being handled
            n += len(fresh)
            await self._dispatch(fresh)
        if n:
            log.info("%s: finishing %d own pending entries", self.s.name, n)

    async def _claim_idle(self, stop: asyncio.Event) -> None:
        """XAUTOCLAIM until its cursor returns 0-0: everything idle for claim_idle_ms, whoever had it."""
        assert self.client is not None
        start: bytes | str = "0-0"
        total = 0
        while not stop.is_set() and (not self._drain or time.monotonic() < self._drain_deadline):
            if not await self._room_or_stop(stop):
                break
            reply = await self.client.xautoclaim(
                self.s.stream, self.s.group, self.s.consumer, self.s.claim_idle_ms, start_id=start, count=self._count()
            )
            start = reply[0]  # Redis 7 adds a third element: ids of deleted entries, already dropped from the PEL
            claimed = [(i, f) for i, f in reply[1] if i is not None and f and i not in self._inflight]
            total += len(claimed)
            await self._dispatch(claimed)
            if start in (b"0-0", "0-0"):
                break
        if total:
            log.info("%s: claimed %d idle pending entries", self.s.name, total)

    # -- in flight ------------------------------------------------------------------------------
    def _count(self) -> int:
        """COUNT for the next read: what the byte budget leaves, in entries as large as the largest of the last
        minute. The first read takes one entry, so a start with huge entries waiting reads them one at a time.
        Best effort: Redis cannot tell sizes before a read, so a read right after a jump in entry size can
        still bring up to COUNT large entries; the reads after it are sized by them."""
        if not self._entry_hint:
            return 1
        room = max(self.s.max_inflight_bytes - self._inflight_bytes, 0)
        return max(1, min(self.s.count, room // self._entry_hint, self.s.max_inflight - len(self._inflight) or 1))

    def _has_room(self) -> bool:
        if self._refused is not None:
            return False
        if not self._inflight:
            return True
        return len(self._inflight) < self.s.max_inflight and self._inflight_bytes < self.s.max_inflight_bytes

    async def _wait_room(self, timeout: float) -> bool:
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(self._has_room), timeout)
                return True
            except asyncio.TimeoutError:
                return False

    async def _room_or_stop(self, stop: asyncio.Event) -> bool:
        """Wait for room to read more; False when stopping first. Drain mode handles chunks inline: always room."""
        while not self._drain and not stop.is_set():
            self._raise_fatal()
            if await self._wait_room(0.5):
                return True
        return not stop.is_set()

    async def _dispatch(self, entries: list[Entry]) -> None:
        """Hand a chunk to the handler: awaited in drain mode, else as a task (many chunks wait in the batcher)."""
        if not entries:
            return
        sizes = [entry_bytes(f) for _, f in entries]
        now = time.monotonic()
        if max(sizes) >= self._entry_hint or now - self._hint_at > HINT_MEMORY_S:
            self._entry_hint, self._hint_at = max(max(sizes), 1), now
        self.max_chunk_bytes = max(self.max_chunk_bytes, sum(sizes))
        for (i, _), n in zip(entries, sizes):
            self._inflight[i] = n
        self._inflight_bytes += sum(sizes)
        self._read_delivered += len(entries)
        if self._drain:
            await self._handle(entries)
            return
        task = asyncio.create_task(self._handle(entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, entries: list[Entry]) -> None:
        try:
            await self.handler(entries)
        except Exception as e:
            if self._drain:
                raise
            if isinstance(e, StreamError) or error_kind(e, "write") == "fatal":
                # a bug or an unfixable error must end the process, never leave a silently dead ingress
                self._fatal = e if isinstance(e, StreamError) else StreamError(f"{self.s.name}: handler failed: {one_line(e)}")
                log.error("%s: %s", self.s.name, self._fatal)
            else:  # Redis away at shutdown: the entries stay pending, the next start finishes them
                log.warning("%s: %d entries left pending: %s", self.s.name, len(entries), one_line(e))
        finally:
            async with self._room:
                for i, _ in entries:
                    self._inflight_bytes -= self._inflight.pop(i, 0)
                self._room.notify_all()

    async def _wait_tasks(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def commit(self, ids: list[bytes], fill: Callable[[Any], None]) -> None:
        """`fill(tx)` queues the writes, XACK of `ids` is added, all in one MULTI/EXEC.

        Refused (OOM, NOPERM, READONLY): retried with backoff while no new entries are read, until it goes
        through (or, when stopping, SHUTDOWN_GRACE_S passed: the entries then stay pending). Redis away:
        retried the same way (the client reconnects). Drain mode: raised at once.
        """
        assert self.client is not None
        backoff = BACKOFF_MIN_S
        while True:
            try:
                async with self.client.pipeline(transaction=True) as tx:
                    fill(tx)
                    if ids:
                        tx.xack(self.s.stream, self.s.group, *ids)
                    await tx.execute()
                if self._refused is not None:
                    log.warning("%s: writes accepted again, reading resumes", self.s.name)
                    self._refused = None
                    self._set_up(True)
                    async with self._room:
                        self._room.notify_all()
                elif self._write_lost:
                    log.info("%s: writing results again", self.s.name)
                    self._set_up(True)
                self._write_lost = False
                return
            except Exception as e:
                kind = error_kind(e, "write")
                self._count_error("write", e)
                if self._drain:
                    raise
                if kind == "nogroup":  # the stream went away: results written, nothing left to acknowledge
                    log.warning("%s: %d entries written, not acknowledged: %s", self.s.name, len(ids), one_line(e))
                    return
                if kind == "fatal":
                    raise self._fatal_error(e, "writing results of") from None
                if kind == "transient" and not self._write_lost:  # one line per outage; the read loop may not notice
                    log.warning("%s: connection lost (%s) while writing results; retrying", self.s.name, one_line(e))
                    self._write_lost = True
                    self._set_up(False, f"redis unreachable: {one_line(e)}")
                if kind == "refused" and self._refused != one_line(e):
                    log.error("%s: redis refuses our writes (%s); reading stops, retrying", self.s.name, one_line(e))
                    self._refused = one_line(e)
                    self._set_up(False)
                since = self._stopping_since
                if since is not None and time.monotonic() - since > SHUTDOWN_GRACE_S:
                    raise
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    # -- housekeeping ---------------------------------------------------------------------------
    async def _keep(self, stop: asyncio.Event) -> None:
        """Keep in-flight entries fresh, publish backlog and pending, delete dead consumers."""
        refresh_every = max(self.s.claim_idle_ms / 3000, 0.05)
        cleanup_every = max(min(self.s.dead_consumer_idle_ms / 2000, 300.0), 1.0)
        next_refresh = next_stats = next_cleanup = 0.0
        warned = False
        while not stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    next_refresh = now + refresh_every
                    await self._refresh()
                if now >= next_stats:
                    next_stats = now + self.s.stats_every_s
                    await self._stats()
                if now >= next_cleanup:
                    next_cleanup = now + cleanup_every
                    await self._delete_dead_consumers()
                warned = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the read loop reports Redis errors; here one line per outage is enough
                if not warned:
                    log.warning("%s: housekeeping: %s", self.s.name, one_line(e))
                    warned = True
            await sleep_or_stop(stop, min(refresh_every, self.s.stats_every_s, 1.0))

    async def _refresh(self) -> None:
        """Reset the idle time of the entries in flight here, so no other consumer claims them."""
        assert self.client is not None
        ids = list(self._inflight)
        for k in range(0, len(ids), 1000):
            await self.client.xclaim(self.s.stream, self.s.group, self.s.consumer, 0, ids[k : k + 1000], justid=True)

    async def _stats(self) -> None:
        assert self.client is not None
        if self.observer is None:
            return
        try:
            groups = await self.client.xinfo_groups(self.s.stream)
        except rx.ResponseError as e:
            if "no such key" in str(e).lower():  # the stream is gone: nothing waits
                self.observer.on_stream_stats(self.s.stream, self.s.group, 0, 0)
                return
            raise
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name != self.s.group:
                continue
            lag = g.get("lag")
            if lag is None:  # Redis cannot tell after deletions in the range: count the undelivered entries
                after = g["last-delivered-id"]
                after = after.decode() if isinstance(after, bytes) else after
                lag = len(await self.client.xrange(self.s.stream, f"({after}", "+", count=10_000))
            self.observer.on_stream_stats(self.s.stream, self.s.group, int(lag), int(g["pending"]))

    async def _delete_dead_consumers(self) -> None:
        assert self.client is not None
        for c in await self.client.xinfo_consumers(self.s.stream, self.s.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == self.s.consumer or int(c["pending"]) or int(c["idle"]) < self.s.dead_consumer_idle_ms:
                continue
            if await self.client.eval(_DEL_IF_IDLE, 1, self.s.stream, self.s.group, name) == 0:
                log.info("%s: deleted consumer %s (no pending entries, idle %.0fs)", self.s.name, name, int(c["idle"]) / 1000)

    async def _leave_group(self) -> None:
        """Clean exit: remove this consumer from the group if nothing is pending for it."""
        assert self.client is not None
        try:
            if await self.client.eval(_DEL_IF_IDLE, 1, self.s.stream, self.s.group, self.s.consumer) == 0:
                log.info("%s: consumer %s left group %s", self.s.name, self.s.consumer, self.s.group)
        except Exception as e:
            log.info("%s: consumer %s stays in group %s: %s", self.s.name, self.s.consumer, self.s.group, one_line(e))

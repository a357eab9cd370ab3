"""Durable webhook intake on a Kafka topic (production mode; embedded mode uses SQLite).

The HTTP layer answers 202 only after `append` returns, and `append` returns only once the
broker acknowledged EVERY message with acks=all; any failure or timeout raises
`StoreUnavailable`, so the client gets 503 and retries instead of losing the body. The
producer is idempotent, so librdkafka's own retries never duplicate or reorder a message.

One message per record line, key = the tenant and the line's entity key
(ingest.webhook.spread: an entity's lines stay in order on one partition, and one tenant's
lines spread over the partitions, so over the consumer group's workers), or the tenant alone
when the door passes no keys (repair functions configured); headers `tenant` and `source`,
timestamp = the request's `received_at`, which the Kafka source turns into `event_time` (lag
is measured from receipt). The topic is read back by an ordinary `KafkaSource`; its consumer
lag is the intake backlog. If `append` fails half way, the lines already sent stay in the
topic: the client's retry repeats them and idempotency absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException, Producer

from ingest.errors import StoreUnavailable
from ingest.kafka_log import client_logger

DELIVERY_TIMEOUT_MS = 10_000  # librdkafka reports every message by then, delivered or not
_GRACE_S = 5.0  # on top of the delivery timeout, in case a report never comes back
_POLL_S = 0.1


class _Pending:
    """Delivery reports of one append. Only the poll thread touches `left`/`failure`."""

    __slots__ = ("failure", "future", "last_offset", "left", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[int] = loop.create_future()
        self.left = n
        self.failure: str | None = None
        self.last_offset = -1

    def report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failure = self.failure or err.str()
        else:
            self.last_offset = max(self.last_offset, msg.offset())
        self.left -= 1
        if self.left == 0:
            self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if self.future.done():
            return
        if self.failure is not None:
            self.future.set_exception(RuntimeError(self.failure))
        else:
            self.future.set_result(self.last_offset)


class KafkaIntake:
    """Appends accepted webhook bodies to `topic`; same `append` contract as SQLiteIntake."""

    def __init__(self, brokers: str, topic: str, extra: Mapping[str, str] | None = None) -> None:
        self.brokers = brokers
        self.topic = topic
        self._conf: dict[str, Any] = {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": DELIVERY_TIMEOUT_MS,
            "client.id": "ingest-webhook-intake",
            **(extra or {}),
        }
        self._producer: Any = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._fatal: str | None = None

    async def start(self) -> None:
        """Create the producer; raise StoreUnavailable if the topic cannot be seen."""
        self._producer = Producer(
            {**self._conf, "error_cb": self._on_error, "logger": client_logger("webhook-intake")}
        )
        try:
            meta = await asyncio.to_thread(self._producer.list_topics, self.topic, 10.0)
        except KafkaException as exc:
            raise self._unavailable(f"metadata: {exc}") from None
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            why = topic.error.str() if topic is not None else "not in metadata"
            raise self._unavailable(f"topic {self.topic!r}: {why}")
        self._running = True
        self._thread = threading.Thread(target=self._poll, name="kafka-intake-poll", daemon=True)
        self._thread.start()

    spread = True  # a topic has partitions of its own, read by the workers of the group

    async def append(
        self,
        tenant: str,
        source: str,
        lines: Sequence[bytes],
        received_at: float,
        keys: Sequence[int] | None = None,
    ) -> int:
        """Return the offset of the last message once ALL are acknowledged (-1 if no lines)."""
        if not lines:
            return -1
        if self._producer is None or not self._running:
            raise self._unavailable("intake not started")
        if self._fatal is not None:
            raise self._unavailable(self._fatal)
        pending = _Pending(asyncio.get_running_loop(), len(lines))
        key = tenant.encode()
        headers = [("tenant", key), ("source", source.encode())]
        ts_ms = int(received_at * 1000)
        for i, line in enumerate(lines):
            k = key if keys is None else b"%s/%08x" % (key, keys[i])
            await self._produce(line, k, headers, ts_ms, pending, len(lines) - i)
        try:
            return await asyncio.wait_for(pending.future, DELIVERY_TIMEOUT_MS / 1000 + _GRACE_S)
        except (RuntimeError, TimeoutError) as exc:
            raise self._unavailable(f"delivery failed: {exc or 'timed out'}") from None

    async def backlog(self) -> tuple[int, float | None]:
        """Always (0, None): once appended, a body is the Kafka source's business, and the
        backlog is that consumer group's lag (`KafkaSource.partition_lag`)."""
        return (0, None)

    async def close(self) -> None:
        if self._producer is None:
            return
        self._running = False  # stop the poll thread first: flush() serves the reports now
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        left = await asyncio.to_thread(self._producer.flush, DELIVERY_TIMEOUT_MS / 1000)
        self._producer = None
        if left:
            raise self._unavailable(f"{left} message(s) undelivered at close")

    async def _produce(
        self,
        line: bytes,
        key: bytes,
        headers: list[tuple[str, bytes]],
        ts_ms: int,
        pending: _Pending,
        remaining: int,
    ) -> None:
        deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT_MS / 1000
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    value=line,
                    key=key,
                    headers=headers,
                    timestamp=ts_ms,
                    on_delivery=pending.report,
                )
                return
            except BufferError:  # local queue full: the poll thread is draining it
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise self._unavailable(f"produce: {exc}") from None
        raise self._unavailable(f"producer queue full; {remaining} line(s) not sent")

    def _poll(self) -> None:
        while self._running:
            self._producer.poll(_POLL_S)

    def _on_error(self, err: Any) -> None:
        # Transient errors (broker down) surface as delivery failures of the messages
        # concerned; a fatal one (idempotence broken) makes this producer unusable.
        if err.fatal():
            self._fatal = f"fatal producer error: {err.str()}"

    def _unavailable(self, cause: str) -> StoreUnavailable:
        return StoreUnavailable("intake", f"kafka://{self.brokers}/{self.topic}", cause)

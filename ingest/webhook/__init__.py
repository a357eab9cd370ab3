"""Webhook intake, in one place: the door, the durable intake, and its reader.

    POST /v1/webhooks/{tenant}/{source}     ingest.webhook.http: checks, then `Intake.append`;
        │                                   202 only once the body is durable
        ▼
    Intake (this module's protocol)         embedded: ingest.webhook.sqlite (a table in the
        │                                   state.db WAL); production: ingest.webhook.kafka
        ▼                                   (a topic, acks=all, idempotent producer)
    read back as a source                   embedded: ingest.webhook.source (WebhookSource);
                                            production: an ordinary KafkaSource on the topic
        ▼
    the pipeline, like every other source (decode, deliver, commit; the intake row or the
    Kafka offset goes only once the records are durable downstream)

Tokens are taken once, at the door: `Admission.try_admit` charges the tenant's bucket (and
the closed-loop bound) when the body is accepted, so the runner of a webhook reader does not
charge the records again when it reads them back (`SourceRunner(take_tokens=False)`, set by
`ingest.factory` for both readers). Charging twice halved a webhook tenant's rate and made a
body that was already answered 202 wait for tokens a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Intake(Protocol):
    """Where the door makes an accepted body durable before answering 202."""

    # True when the intake has several partitions read by different workers: the door then
    # passes each line's entity key (ingest.webhook.spread) so a tenant's lines spread
    spread: bool

    async def append(
        self,
        tenant: str,
        source: str,
        lines: Sequence[bytes],
        received_at: float,
        keys: Sequence[int] | None = None,
    ) -> int:
        """Durable on return (else raises StoreUnavailable); returns an id for the sender.
        `keys`: each line's partition key (None: the tenant's)."""
        ...

    async def close(self) -> None: ...

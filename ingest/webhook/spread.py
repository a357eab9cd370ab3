"""Which intake partition a webhook record goes to: its entity's, not its tenant's.

Why: a pod's workers divide the webhook intake by partition (ingest.webhook.sqlite; Kafka
partitions in production). Keyed by tenant, one busy tenant kept one worker busy and the
others idle (bench/bench_steady.py: w0 75-90 % of a core, w1 3-8 %, p95 lag 14.9 s at 80 % of
the peak). Keyed by entity, a tenant's records spread over every worker.

What must stay: the sinks judge an entity's revisions in the order they arrive (higher
applies, equal is a repeat, lower is OLDER_REVISION in the DLQ: `judge_batch`), and the
pipeline's exactness after a kill -9 rests on one reader seeing every uncommitted record of
an entity (docs/architecture.md, "Pipelined batches"). Both need only that all records of
one entity reach one worker, in order: the key below is a function of the entity key
(tenant, entity_type, entity_id) as the decoder reads it, so the records of an entity share
a partition; different entities may share one too (a hash), which costs nothing.

A line whose entity the door cannot read (not JSON, not an object, fields missing or not
strings) can never reach a sink: it is judged VALIDATION_FAIL / SCHEMA_DRIFT whatever worker
reads it. It is keyed by its bytes, so repeats of the same bytes still meet on one worker.
When repair functions are configured (`transformers`), they may rewrite the entity fields
after the door has looked: then every line keeps its tenant's partition (`tenant_key`).
"""

from __future__ import annotations

import zlib
from typing import Any

NOT_JSON: Any = object()  # the value of a line that did not parse


def tenant_key(tenant: str) -> int:
    """The key of every line of a tenant when records are not spread (and of the intake
    rows written before they were)."""
    return zlib.crc32(tenant.encode())


def entity_key(tenant: str, value: Any, line: bytes) -> int:
    """The partition key of one record line: crc32 over its entity key, or over its bytes
    when the line has no entity the decoder could accept (`value` is the parsed line, or
    NOT_JSON). schema_version 1 names the fields `type` and `id` (ingest/transformers)."""
    seed = zlib.crc32(tenant.encode())
    if type(value) is dict:
        version = value.get("schema_version")
        v1 = type(version) is int and version == 1
        kind = value.get("type" if v1 else "entity_type")
        ident = value.get("id" if v1 else "entity_id")
        if type(kind) is str and type(ident) is str:
            key = zlib.crc32(kind.encode(errors="surrogatepass"), seed)
            return zlib.crc32(b"\x00" + ident.encode(errors="surrogatepass"), key)
    return zlib.crc32(b"\x01" + line, seed)

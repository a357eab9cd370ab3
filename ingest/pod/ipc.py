"""The pod's one wire: workers <-> control plane over a Unix socket, one JSON object a line.

Workers connect to the control plane's socket and say who they are (`hello`), then report
(`progress` several times a second: queue depth, state, records drained out of the webhook
intake; `report` once a second: their /health/detailed document and their metric samples).
The control plane sends `control` (paused / draining / brownout rate) and `notify` (a webhook
body was appended). asyncio streams and orjson: no protocol of our own beyond the framing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

ENV_WORKER = "INGEST_POD_WORKER"  # "i/n": this process is worker i of a pod of n
ENV_SOCKET = "INGEST_POD_SOCKET"  # the control plane's Unix socket
ENV_PARENT = "INGEST_POD_PARENT"  # the control plane's pid (die with it)
LIMIT = 64 * 1024 * 1024  # one line may carry a whole health document and metric set

Message = dict[str, Any]


def encode(msg: Message) -> bytes:
    """One message as its line on the wire."""
    return orjson.dumps(msg, option=orjson.OPT_NON_STR_KEYS) + b"\n"


async def send(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.write(encode(msg))
    await writer.drain()


async def recv(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None once the other side has gone."""
    try:
        line = await reader.readline()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        return None
    if not line:
        return None
    msg: Message = orjson.loads(line)
    return msg

"""librdkafka log lines, each distinct one once per window (ingest.kafka_log)."""

from __future__ import annotations

import logging
import re

from hypothesis import given
from hypothesis import strategies as st

from ingest.kafka_log import REPEAT_S, Repeats, client_logger

CONNECT = "127.0.0.1:{port}/bootstrap: Connect to ipv4#127.0.0.1:{port} failed (after {ms}ms)"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_reconnect_storm_is_one_line_per_window_with_the_count() -> None:
    clock = Clock()
    repeats = Repeats(clock=clock)
    written = []
    for i in range(1200):  # 20 a second for 60 s, timings varying
        clock.now = i * 0.05
        line = repeats.admit(CONNECT.format(port=9092, ms=i % 3))
        if line is not None:
            written.append(line)
    assert len(written) == 2
    assert written[0].endswith("(after 0ms)")
    assert "(and 599 more in the last 30 s)" in written[1]


messages = st.lists(
    st.tuples(st.floats(0, 40, allow_nan=False), st.sampled_from(["a 1", "a 22", "b", "c 3 d"])),
    max_size=200,
)


@given(messages)
def test_each_kind_once_per_window_and_every_message_accounted_for(
    steps: list[tuple[float, str]],
) -> None:
    clock = Clock()
    repeats = Repeats(clock=clock)
    last_written: dict[str, float] = {}
    held_since: dict[str, int] = {}  # held back since the kind was last written
    for gap, message in steps:
        clock.now += gap
        kind = re.sub(r"\d+", "#", message)
        line = repeats.admit(message)
        if line is None:
            assert clock.now - last_written[kind] < REPEAT_S
            held_since[kind] += 1
            continue
        assert kind not in last_written or clock.now - last_written[kind] >= REPEAT_S
        m = re.search(r"\(and (\d+) more", line)
        assert (int(m.group(1)) if m else 0) == held_since.get(kind, 0)
        assert line.startswith(message)
        last_written[kind], held_since[kind] = clock.now, 0


def test_client_logger_filters_once_however_often_asked(caplog: object) -> None:
    a, b = client_logger("t"), client_logger("t")
    assert a is b and len(a.filters) == 1
    with caplog.at_level(logging.WARNING, logger="ingest.librdkafka.t"):  # type: ignore[attr-defined]
        for ms in range(50):
            a.error("FAIL [rdkafka#consumer-1] %s", CONNECT.format(port=1, ms=ms))
    assert len(caplog.records) == 1  # type: ignore[attr-defined]

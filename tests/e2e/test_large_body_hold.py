"""The large-body hold of the webhook door, against the service as a process.

A body larger than the lag budget, refused behind a non-empty intake, holds the door so steady
traffic cannot starve it (39443c7). Every re-send of it renewed the hold: one tenant re-sending
such a body in a loop, never waiting, kept every other tenant at 429 for as long as it went
on. The hold is bounded now (ingest/pipeline/closed_loop.py): one hold at a time, its length
fixed when granted (at most max_retry_after_seconds + 10 s), followed by the others' turn.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e._service import ServiceProcess

pytestmark = pytest.mark.e2e
RETRY_CAP = 2  # admission.intake.max_retry_after_seconds below
HOLD_MAX = RETRY_CAP + 10  # + LARGE_HOLD_GRACE: the longest a hold keeps the others out
LARGE = 10_000  # records: more than the bound (0.1 s of drain: ~1,000 records here)
LOOP_SECONDS = 60.0
HOSTILE_CLIENTS = 6  # one tenant's client, 6 requests at a time


def ndjson(tenant: str, prefix: str, n: int) -> str:
    return "\n".join(
        json.dumps({"schema_version": 3, "tenant_id": tenant, "entity_type": "order",
                    "entity_id": f"{prefix}-{i}", "revision": 1,
                    "occurred_at": "2025-01-01T00:00:00Z", "attributes": {"amount": i}})
        for i in range(n)
    )  # fmt: skip


def test_a_tenant_re_sending_a_large_body_in_a_loop_does_not_keep_another_out(
    tmp_path: Path,
) -> None:
    config = tmp_path / "ingest.yaml"
    config.write_text(
        "tenants:\n"
        "  hostile: {rate: 1000000, burst: 1000000}\n"
        "  victim: {rate: 1000000, burst: 1000000}\n"
        "admission:\n"
        "  intake: {lag_budget_seconds: 0.1, min_backlog_records: 50,"
        f" max_retry_after_seconds: {RETRY_CAP}}}\n"
    )
    svc = ServiceProcess(tmp_path / "d", config=config).start()
    stop = threading.Event()
    victim: list[tuple[float, int]] = []  # (monotonic, status)
    hostile: list[int] = []
    held = [0]  # the hostile's 429s that held the door for it
    errors: list[BaseException] = []

    def send_victim() -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                i += 1
                body = ndjson("victim", f"v{i}", 10)
                try:
                    r = svc.post_webhook("victim", "shop", body, client=client,
                                         content_type="application/x-ndjson")  # fmt: skip
                    victim.append((time.monotonic(), r.status_code))
                except httpx.HTTPError as exc:  # a loaded host: counted as not let in
                    errors.append(exc)
                stop.wait(0.25)

    def send_hostile(k: int) -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                i += 1  # a new batch each time (an exact replay would be refused as one)
                body = ndjson("hostile", f"h{k}-{i}", LARGE)
                try:
                    r = svc.post_webhook("hostile", "shop", body, client=client,
                                         content_type="application/x-ndjson")  # fmt: skip
                    hostile.append(r.status_code)
                    held[0] += "new requests wait meanwhile" in r.text
                except httpx.HTTPError as exc:
                    errors.append(exc)
                stop.wait(0.05)  # never waits its Retry-After

    threads = [threading.Thread(target=send_victim, daemon=True)]
    try:
        for t in threads:
            t.start()
        time.sleep(3)  # the victim alone first: the intake's size and rate get measured
        for k in range(HOSTILE_CLIENTS):
            threads.append(threading.Thread(target=send_hostile, args=(k,), daemon=True))
            threads[-1].start()
        started = time.monotonic()
        time.sleep(LOOP_SECONDS)
        stop.set()
        for t in threads:
            t.join(30)
        ended = time.monotonic()
    finally:
        stop.set()
        svc.stop()

    during = [(t, status) for t, status in victim if t >= started]
    accepted = [t for t, status in during if status == 202]
    gaps = [b - a for a, b in zip([started, *accepted], [*accepted, ended], strict=True)]
    print(f"victim: {len(accepted)} of {len(during)} accepted during the loop, longest wait "
          f"{max(gaps):.1f} s; "
          f"hostile: {hostile.count(202)} of {len(hostile)} accepted, {held[0]} held the door; "
          f"errors {len(errors)}")  # fmt: skip
    # The victim is kept out at most one hold, the drain of the large body taken at its end
    # and a loaded host's slack (measured: 2.4 s; the old rule: 10 to 30 s) ...
    assert max(gaps) <= HOLD_MAX + 8, (max(gaps), len(accepted))
    # ... and after each, it has its turn at least as long: let in most of the time
    # (measured: 127 of 230; the old rule: 8 of 240, 16 of 230).
    assert len(accepted) >= 0.25 * len(during), (len(accepted), len(during))
    assert {s for _, s in victim} <= {202, 429}, {s for _, s in victim}
    assert held[0] >= 1  # the door was held for the hostile tenant
    assert hostile.count(202) >= 1  # and its body is taken (it is not refused for good)


def test_a_patient_large_sender_is_served_before_one_that_came_after_it_and_hammers(
    tmp_path: Path,
) -> None:
    """Large senders wait in line, first refused first served (review: after a hold, the next
    one went to whoever re-sent first, so tenants re-sending every 50 ms won it ahead of one
    that retried as told). `hammer1` holds the door; `patient` is refused and retries as told;
    then `hammer2` re-sends in a loop from 6 clients: `patient`'s body is taken first. Each
    tenant sent a body before (a place is taken before a body is read only by a tenant that
    authenticated once: docs/architecture.md)."""
    config = tmp_path / "ingest.yaml"
    config.write_text(
        "tenants:\n"
        + "".join(f"  {t}: {{rate: 1000000, burst: 1000000}}\n"
                  for t in ("hammer1", "hammer2", "patient", "victim"))
        + "admission:\n"
        "  intake: {lag_budget_seconds: 0.1, min_backlog_records: 50,"
        f" max_retry_after_seconds: {RETRY_CAP}}}\n"
    )  # fmt: skip
    svc = ServiceProcess(tmp_path / "d", config=config).start()
    stop = threading.Event()
    accepted: dict[str, list[float]] = {"hammer1": [], "hammer2": []}
    hammer1_answered = threading.Event()  # hammer1 was refused (holds the door) or taken
    errors: list[BaseException] = []

    def send(tenant: str, k: int, pause: float) -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                i += 1  # a new batch each time (an exact replay would be refused as one)
                n = 10 if tenant == "victim" else LARGE
                body = ndjson(tenant, f"{tenant}{k}-{i}", n)
                try:
                    r = svc.post_webhook(tenant, "shop", body, client=client,
                                         content_type="application/x-ndjson")  # fmt: skip
                    if tenant in accepted:
                        hammer1_answered.set()
                        if r.status_code == 202:
                            accepted[tenant].append(time.monotonic())
                except httpx.HTTPError as exc:
                    errors.append(exc)
                stop.wait(pause)

    threads = [threading.Thread(target=send, args=("victim", 0, 0.25), daemon=True)]
    patient_taken: float | None = None
    patient_refusals: list[httpx.Response] = []
    patient_sent: list[float] = []
    try:
        threads[0].start()
        time.sleep(3)  # the victim alone first: the intake's size and rate get measured
        for tenant in ("hammer1", "hammer2", "patient"):  # tenants this pod has seen before
            r = svc.post_webhook(tenant, "shop", ndjson(tenant, "hello", 1),
                                 content_type="application/x-ndjson")  # fmt: skip
            assert r.status_code == 202, r.text
        for k in range(3):
            threads.append(threading.Thread(target=send, args=("hammer1", k, 0.05), daemon=True))
            threads[-1].start()
        assert hammer1_answered.wait(30)
        with httpx.Client() as client:
            deadline = time.monotonic() + 90
            i = 0
            while time.monotonic() < deadline:
                i += 1
                patient_sent.append(time.monotonic())
                r = svc.post_webhook("patient", "shop", ndjson("patient", f"p{i}", LARGE),
                                     client=client, content_type="application/x-ndjson",
                                     timeout=30)  # fmt: skip
                if r.status_code == 202:
                    patient_taken = time.monotonic()
                    break
                assert r.status_code == 429, r.text
                patient_refusals.append(r)
                if len(patient_refusals) == 1:  # in line: now the second hammerer comes
                    for k in range(6):
                        threads.append(threading.Thread(
                            target=send, args=("hammer2", k, 0.05), daemon=True))  # fmt: skip
                        threads[-1].start()
                time.sleep(float(r.headers["Retry-After"]))  # as told
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        svc.stop()

    hammer2 = accepted["hammer2"]
    print(f"patient: taken after {len(patient_refusals)} refusals; hammer1: "
          f"{len(accepted['hammer1'])} taken; hammer2: {len(hammer2)} taken; "
          f"errors {len(errors)}")  # fmt: skip
    assert patient_taken is not None, [r.text for r in patient_refusals[-3:]]
    assert all(int(r.headers["Retry-After"]) <= RETRY_CAP for r in patient_refusals)
    # taken before any body of the tenant that was refused after it, however hard it tried
    assert not hammer2 or patient_taken < hammer2[0], (
        patient_taken,
        hammer2[:3],
        patient_sent,
        [r.text for r in patient_refusals],
    )

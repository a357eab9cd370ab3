"""Embedded mode: a signed webhook's replay reservation is made in its intake append's own
transaction on state.db (ingest.auth.seen, `Guard(joint=True)`): one wait on the file's writer
lock a request, a replay refused however the two requests race, and a body not made durable
leaves no signature behind."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ingest import config as cfgmod
from ingest.auth import credentials as C
from ingest.auth import setup as auth_setup
from ingest.auth import signing
from ingest.auth.guard import Guard, Identity, Refusal, WebhookCheck
from ingest.auth.seen import SQLiteSeen
from ingest.state.sqlite import SQLiteDB, immediate
from ingest.webhook import Replayed
from ingest.webhook.sqlite import SQLiteIntake

pytestmark = pytest.mark.integration

SECRET = "whsec_acme-0123456789abcdef"
BODY = b'{"id": 1}'


def _source() -> C.CredentialSource:
    return C.CredentialSource(
        C.Credentials.model_validate(
            {"tokens": [], "tenants": {"acme-corp": {"secrets": [SECRET]}}}
        )
    )


def _check(g: Guard, body: bytes = BODY) -> WebhookCheck:
    ts = int(g.clock())
    headers = {signing.HEADER.lower(): signing.header_value([SECRET], body, timestamp=ts)}
    check = g.webhook_headers("acme-corp", headers)
    assert isinstance(check, WebhookCheck)
    return check


async def _door(g: Guard, intake: SQLiteIntake, check: WebhookCheck, body: bytes = BODY) -> Any:
    """What the door does with a body: the guard, then the append (ingest.webhook.http)."""
    who = await g.webhook_body(check, body)
    if isinstance(who, Refusal):
        return who
    assert isinstance(who, Identity) and check.seen_key is None
    return await intake.append("acme-corp", "hooks", [body], 1.0, None, check.reservation)


def _count(db_path: Path, sql: str) -> int:
    with sqlite3.connect(db_path) as c:
        n: int = c.execute(sql).fetchone()[0]
    return n


@pytest.fixture
async def state(tmp_path: Path) -> Any:
    db = await SQLiteDB.open(tmp_path / "state.db")
    # the control plane's two handles on state.db: its stores' (seen) and its intake's
    intake_db = await SQLiteDB.open(tmp_path / "state.db")
    try:
        yield db, intake_db
    finally:
        await db.close()
        await intake_db.close()


async def test_the_signature_check_waits_on_no_writer_lock(state: Any, tmp_path: Path) -> None:
    """While another process holds state.db's writer lock (a checkpointer's locked tail on a
    slow disk), the signature check answers: only the append waits, once. Before, the
    reservation was a write transaction of its own: a second wait behind the same holder."""
    db, intake_db = state
    g = Guard(_source(), SQLiteSeen(db), joint=True)
    intake = SQLiteIntake(intake_db)
    holder = await SQLiteDB.open(tmp_path / "state.db")
    entered, release = threading.Event(), threading.Event()

    def hold(c: sqlite3.Connection) -> None:
        with immediate(c):
            entered.set()
            assert release.wait(30)

    try:
        holding = asyncio.ensure_future(holder.run(hold))
        assert await asyncio.to_thread(entered.wait, 30)
        check = _check(g)
        who = await asyncio.wait_for(g.webhook_body(check, BODY), 5)
        assert isinstance(who, Identity) and check.reservation is not None
        append = asyncio.ensure_future(
            intake.append("acme-corp", "hooks", [BODY], 1.0, None, check.reservation)
        )
        await asyncio.sleep(0.3)
        assert not append.done()  # the one wait: the body and its signature together
        release.set()
        await holding
        assert await append > 0
    finally:
        release.set()
        await holder.close()
    assert _count(tmp_path / "state.db", "SELECT count(*) FROM seen_signatures") == 1


async def test_a_replay_is_refused_however_it_races(state: Any, tmp_path: Path) -> None:
    db, intake_db = state
    g = Guard(_source(), SQLiteSeen(db), joint=True)
    intake = SQLiteIntake(intake_db)
    first, second = _check(g), _check(g)
    # both pass the look-up before either is stored: the append decides
    assert isinstance(await g.webhook_body(first, BODY), Identity)
    assert isinstance(await g.webhook_body(second, BODY), Identity)
    assert await intake.append("acme-corp", "hooks", [BODY], 1.0, None, first.reservation) > 0
    with pytest.raises(Replayed):
        await intake.append("acme-corp", "hooks", [BODY], 1.0, None, second.reservation)
    assert _count(tmp_path / "state.db", "SELECT count(*) FROM intake") == 1
    # once stored, the look-up refuses it before anything else
    refusal = await _door(g, intake, _check(g))
    assert isinstance(refusal, Refusal) and refusal.error == "replayed_signature"
    assert _count(tmp_path / "state.db", "SELECT count(*) FROM intake") == 1
    # another body is another request
    assert await _door(g, intake, _check(g, b'{"id": 2}'), b'{"id": 2}') > 0


async def test_a_body_not_made_durable_leaves_no_signature(state: Any, tmp_path: Path) -> None:
    """The append fails after the reservation (here a trigger refuses the row): both roll
    back, so the sender's retry of the very same request is accepted. Before, the
    reservation was committed first and only a 429/503 answer released it: an append that
    raised anything else left the request refused as a replay for the whole window."""
    db, intake_db = state
    g = Guard(_source(), SQLiteSeen(db), joint=True)
    intake = SQLiteIntake(intake_db)
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as c:
        c.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON intake BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    check = _check(g)
    with pytest.raises(sqlite3.IntegrityError):
        await _door(g, intake, check)
    assert _count(path, "SELECT count(*) FROM seen_signatures") == 0
    with sqlite3.connect(path) as c:
        c.execute("DROP TRIGGER refuse")
    assert await _door(g, intake, _check(g)) > 0
    assert _count(path, "SELECT count(*) FROM seen_signatures") == 1


async def test_joint_only_for_an_intake_in_the_seen_stores_file(state: Any, tmp_path: Path) -> None:
    db, intake_db = state
    cfg = cfgmod.Config.model_validate({"data_dir": str(tmp_path)})
    setup = auth_setup.AuthSetup(_source())
    stores = SimpleNamespace(sqlite_db=db)
    assert auth_setup.guard(cfg, setup, stores, SQLiteIntake(intake_db)).joint is not None
    other = await SQLiteDB.open(tmp_path / "intake.db")
    try:
        assert auth_setup.guard(cfg, setup, stores, SQLiteIntake(other)).joint is None
    finally:
        await other.close()
    assert auth_setup.guard(cfg, setup, stores, None).joint is None

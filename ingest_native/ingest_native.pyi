# Types of the compiled module (src/lib.rs), for mypy; maturin ships this file in the wheel.
from collections.abc import Callable
from typing import Any

SCHEMA_SHA256: str

def decode_records(
    raws: list[Any],
    record: type[Any],
    times: dict[str, float],
    horizon: float,
    limit: int,
    rows: bool = True,
    sqlite_rows: bool = False,
    facts: bool = False,
    bodies: bool | Callable[[str, str], bool] | None = None,
) -> Any: ...
def canonical_json(data: bytes) -> bytes | None: ...
def timestamptz_micros(s: str) -> int | None: ...
def occurred_unix_seconds(s: str) -> float | None: ...
def flock_wait(fd: int, timeout: float) -> bool: ...

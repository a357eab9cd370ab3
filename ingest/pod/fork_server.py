"""Imported first in a pod's fork server (`ingest.pod.spawn` preloads it), and nowhere else.

A SIGTERM sent to the pod's whole process group (systemd's default KillMode=control-group,
`timeout`, `kill -TERM -<pgid>`) reaches the fork server too. Killed by it, it would take its
workers with it (PR_SET_PDEATHSIG) in the middle of their drain. So it blocks SIGTERM: it still
exits as soon as the control plane is gone. Blocked, not ignored: a worker inherits the mask,
so a SIGTERM sent to a worker while multiprocessing is still setting it up stays pending
instead of being lost; the worker takes SIGTERM over and unblocks it first thing in its own
code (`ingest.pod.spawn._worker`), where such a pending SIGTERM ends it at once with exit 0
(nothing is open or read yet: a stop with nothing to drain); from its event loop on, SIGTERM
drains it.

The fork server's imports are the longest step from `ingest run` to a worker's first record
(docs/benchmarks.md, s3up), so two things it used to do are not done:

* The cyclic garbage collector is off in it: with the default thresholds it scanned the
  growing heap again and again while the modules were imported. A worker turns it back on,
  after freezing what it inherited (`ingest.pod.spawn._worker`): the ~110,000 objects of the
  imported modules are never scanned, nor their pages copied, by a worker's collections (each
  worker's first `gc.collect()` over them cost ~0.08 s of CPU). The few thousand objects of
  import-time garbage stay, frozen, shared by every worker.
* multiprocessing runs the parent's main module again in each child as `__mp_main__` (so that
  a target defined in `__main__` can be unpickled), and the fork server imported it first for
  that (the CLI: typer, click, rich). A worker's target is `ingest.pod.spawn._worker`, never
  in `__main__`: the child's preparation skips that step (`_prepare`), and the fork server
  does not import the CLI (`ingest.pod.spawn.preload_modules`).
"""

import gc
import signal
from collections.abc import Mapping
from multiprocessing import spawn
from typing import Any

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
gc.disable()

_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")
_prepare = spawn.prepare


def _prepare_without_main(data: Mapping[str, Any]) -> None:
    """multiprocessing's `prepare` in a forked child (sys.path, cwd, name, authkey...), less
    re-running the control plane's main module."""
    _prepare({k: v for k, v in data.items() if k not in _MAIN_KEYS})


spawn.prepare = _prepare_without_main

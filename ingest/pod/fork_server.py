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

multiprocessing runs the control plane's main module again in each child, as `__mp_main__`
(runpy); the fork server preloaded it under its own name (`python -m ingest.cli.ingest`), so
runpy would warn in every worker's log that it is already imported. Harmless here (the module
only defines the CLI's commands): that one warning is not shown, in the fork server and the
workers it forks.
"""

import signal
import warnings

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
warnings.filterwarnings(
    "ignore", message=r"'.*' found in sys\.modules after import of package", category=RuntimeWarning
)

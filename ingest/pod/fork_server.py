"""Imported first in a pod's fork server (`ingest.pod.spawn` preloads it), and nowhere else.

A SIGTERM sent to the pod's whole process group (systemd's default KillMode=control-group,
`timeout`, `kill -TERM -<pgid>`) reaches the fork server too. Killed by it, it would take its
workers with it (PR_SET_PDEATHSIG) in the middle of their drain. So it ignores SIGTERM: it still
exits as soon as the control plane is gone, and each worker sets SIGTERM back to the default
before anything else (`ingest.pod.spawn`), so a SIGTERM drains it as before.

multiprocessing runs the control plane's main module again in each child, as `__mp_main__`
(runpy); the fork server preloaded it under its own name (`python -m ingest.cli.ingest`), so
runpy would warn in every worker's log that it is already imported. Harmless here (the module
only defines the CLI's commands): that one warning is not shown, in the fork server and the
workers it forks.
"""

import signal
import warnings

signal.signal(signal.SIGTERM, signal.SIG_IGN)
warnings.filterwarnings(
    "ignore", message=r"'.*' found in sys\.modules after import of package", category=RuntimeWarning
)

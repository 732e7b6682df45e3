"""Imported only by the fork server that local workers are forked from (see ``engine._loky``).

When a command ends, the server sees its parent gone and exits. The interpreter's teardown,
with scikit-learn, SciPy and ONNX Runtime loaded, would then take ≈ 0.4 s (measured), and
whatever reads the command's output through a pipe (a CI log, ``$(...)``, a scheduler)
waits for it, because the server holds the same stdout and stderr. The server has nothing
to flush or clean up, so it ends at once. Workers forked from it never run exit handlers:
multiprocessing ends each of them with ``os._exit``.
"""

from __future__ import annotations

import atexit
import os
import sys


def _end_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


atexit.register(_end_now)

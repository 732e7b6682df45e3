"""What the fork server that local workers are forked from holds (see ``engine._use_fork_server``).

The only module the server is asked to preload. It imports the training stack and
registers the ONNX converters, so each forked worker starts with scikit-learn, SciPy,
LightGBM, ONNX, ONNX Runtime and skl2onnx loaded, and imports the command line, which the
console script imports again in every worker (as ``__mp_main__``).

When a command ends, the server sees its parent gone and exits. The interpreter's
teardown, with all of that loaded, would take a noticeable time, and whatever reads the
command's output through a pipe (a CI log, ``$(...)``, a scheduler) waits for it, because
the server holds the same stdout and stderr. The server has nothing to flush or clean up,
so it ends at once. Workers forked from it never run exit handlers: multiprocessing ends
each of them with ``os._exit``.

A command killed outright (``kill -9``, a scheduler's timeout) would leave the server and
its workers behind: workers wait on their call queue until loky's idle timeout (300 s),
and the server lives while any worker does. On Linux the kernel is asked to kill the
server when the command dies, and each worker when the server dies, so nothing outlives
the command.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys

import manymodels.cli  # noqa: F401
import manymodels.fit  # noqa: F401
from manymodels.export._convert import ensure_registered

_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_parent(parent: int) -> None:
    """Be killed (SIGKILL) when ``parent`` dies, or end now if it already has.

    The signal follows the parent thread that started this process: the command's main
    thread for the server, the server's only thread for a worker.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _end_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ensure_registered()  # imports skl2onnx: each worker's first full conversion needs it
atexit.register(_end_now)
_die_with_parent(int(os.environ.get("MANYMODELS_FORKSERVER_PARENT", os.getppid())))
_SERVER_PID = os.getpid()
os.register_at_fork(after_in_child=lambda: _die_with_parent(_SERVER_PID))

"""What the fork server that local workers are forked from holds (see ``engine._loky_backend``).

The only module the server is asked to preload. It imports the training stack and
registers the ONNX converters, so each forked worker starts with scikit-learn, SciPy,
LightGBM, ONNX, ONNX Runtime and skl2onnx loaded, and imports the command line, which the
console script imports again in every worker (as ``__mp_main__``).

When a command ends, the server sees its parent gone and exits. The interpreter's
teardown, with all of that loaded, would take ≈ 0.4 s (measured), and whatever reads the
command's output through a pipe (a CI log, ``$(...)``, a scheduler) waits for it, because
the server holds the same stdout and stderr. The server has nothing to flush or clean up,
so it ends at once. Workers forked from it never run exit handlers: multiprocessing ends
each of them with ``os._exit``.
"""

from __future__ import annotations

import atexit
import os
import sys

import manymodels.cli  # noqa: F401
import manymodels.fit  # noqa: F401
from manymodels.export._convert import ensure_registered


def _end_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ensure_registered()  # imports skl2onnx: each worker's first full conversion needs it
atexit.register(_end_now)

"""Import TensorFlow without its start-up lines on stderr (`synth` and `verify`, unless --verbose).

TensorFlow's native libraries log while they load, through absl before absl is set up: "All log messages
before absl::InitializeLog() is called are written to STDERR", "I0000 ... oneDNN custom operations are on",
CPU-feature and CUDA-probing lines, once per library (so twice). TF_CPP_MIN_LOG_LEVEL does not reach the
first of them. So the import (and the device probing that follows at the first op) runs with file
descriptor 2 sent to a temporary file; the lines that are known start-up noise are dropped, anything else
is written back to stderr. TF_ENABLE_ONEDNN_OPTS is left alone: it changes results, not only messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Start-up lines, whatever the process id and timestamp in their absl prefix.
NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
        r"^[IW]\d{4} [\d:. ]+\d+ \S+\] ",  # absl INFO and WARNING lines (oneDNN, CPU features, cuda stubs)
        r"^To enable the following instructions: .* rebuild TensorFlow",
        r"^E\d{4} [\d:. ]+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit",  # a CPU-only machine probing for GPUs
    )
)


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


@contextlib.contextmanager
def _stderr_into(lines: list[str]) -> Iterator[None]:
    """Native writes to fd 2 go to a temporary file; `lines` gets its lines when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                capture.seek(0)
                lines += capture.read().decode(errors="replace").splitlines()
    finally:
        os.close(saved)


def import_tensorflow(verbose: bool = False):
    """The `tensorflow` module; unless `verbose`, imported without its start-up noise (see the module)."""
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's own INFO and WARNING lines
    lines: list[str] = []
    try:
        with _stderr_into(lines):
            import tensorflow as tf

            tf.config.list_physical_devices()  # the device probing, here rather than at the first op
    finally:  # what was not noise (an import error's own output) is shown, error or not
        kept = [line for line in lines if not is_noise(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
    tf.get_logger().setLevel("ERROR")  # deprecation notices of ops the reference uses on purpose
    return tf

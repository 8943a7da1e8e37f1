"""A converter killed or failing mid-write leaves no partial output under the output name.

The weights are written to a hidden `.X.pth.<pid>.<random>.tmp` beside the output and renamed into
place once complete. SIGKILL leaves that hidden file behind (nothing can run after SIGKILL): it is
never visible under the output name, and the next run that writes the same output deletes it, as
its writer is dead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.helpers import run_cli

B7_OUTPUT_BYTES = 66_347_960 * 4  # float32 parameters of b7, about 265 MB


@pytest.fixture(scope="module")
def b7_checkpoint(tmp_path_factory) -> Path:
    """A b7-sized official-format checkpoint (raw weights only), written by TensorFlow in seconds."""
    from effconv.models.tf_reference import official_variable_shapes
    from effconv.parity.synth import write_checkpoint

    shapes = official_variable_shapes("b7", 1000)
    weights = {name: np.full(shape, 0.01, np.float32) for name, shape in shapes.items()}
    return write_checkpoint(weights, tmp_path_factory.mktemp("b7") / "efficientnet-b7").parent


def convert_command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "effconv.cli", "convert", "--src", str(src), "--out", str(out), "-q", *extra]


def kill_while_writing(command: list[str], out: Path) -> tuple[Path, int]:
    """Start `command`, SIGKILL it once its hidden temporary for `out` exists and is growing.

    Returns the temporary and the size it had reached; fails if the run ends first.
    """
    _, temporary, size = signal_while_writing(command, out, signal.SIGKILL)
    return temporary, size


def signal_while_writing(command: list[str], out: Path, sig: int) -> tuple[subprocess.Popen, Path, int]:
    """Start `command`, send it `sig` once its hidden temporary for `out` is growing, wait for it to end.

    Returns the ended process (its stderr still to read), the temporary and the size it had reached.
    """
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, seen = time.monotonic() + 300, {}
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for entry in os.scandir(out.parent):
                if entry.name.startswith(f".{out.name}.") and entry.name.endswith(".tmp"):
                    size = entry.stat().st_size
                    if 0 < seen.get(entry.name, size) < size:  # grown since the last look: mid-write
                        os.kill(proc.pid, sig)
                        proc.wait(timeout=120)
                        return proc, out.parent / entry.name, size
                    seen[entry.name] = size
            time.sleep(0.001)
        pytest.fail(f"the converter ended before it could be killed mid-write: {proc.stderr.read().decode()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_sigkill_mid_write_leaves_no_output_and_next_run_cleans_up(b7_checkpoint, tmp_path):
    out = tmp_path / "b7.pth"
    temporary, size = kill_while_writing(convert_command(b7_checkpoint, out, "--variant", "standard"), out)
    assert 0 < size < B7_OUTPUT_BYTES  # it really was killed with the weights half written
    assert visible(tmp_path) == []  # neither X.pth nor X.json: no partial output under the output name
    assert temporary.exists() and temporary.name.startswith(".b7.pth.")  # hidden, named after its dead writer
    # The next run writing the same output removes what the killed one left (its writer is dead).
    result = run_cli("convert", "--src", b7_checkpoint, "--out", out, "-q", "--variant", "standard")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b7.json", "b7.pth"]
    assert out.stat().st_size > B7_OUTPUT_BYTES


def test_sigkill_mid_forced_overwrite_keeps_the_old_files(b7_checkpoint, tmp_path):
    out, card = tmp_path / "b7.pth", tmp_path / "b7.json"
    out.write_bytes(b"precious weights")
    card.write_text('{"precious": "card"}\n')
    command = convert_command(b7_checkpoint, out, "--variant", "standard", "--force")
    kill_while_writing(command, out)
    assert out.read_bytes() == b"precious weights" and card.read_text() == '{"precious": "card"}\n'
    assert visible(tmp_path) == ["b7.json", "b7.pth"]


def test_failed_forced_overwrite_keeps_the_old_files(fixture_ckpt, tmp_path):
    """A write that fails half-way (here a 1 MB file-size limit, as a full disk) is a clean error."""
    out, card = tmp_path / "b0.pth", tmp_path / "b0.json"
    out.write_bytes(b"precious weights")
    card.write_text('{"precious": "card"}\n')
    limited = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY)); "
        "sys.argv = sys.argv[1:]; runpy.run_module('effconv.cli', run_name='__main__')"
    )
    command = [
        sys.executable,
        "-c",
        limited,
        *convert_command(fixture_ckpt, out, "--force", "--variant", "standard")[2:],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"effconv: error: cannot write {out}"), result.stderr
    assert out.read_bytes() == b"precious weights" and card.read_text() == '{"precious": "card"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.json", "b0.pth"]  # no temporary left


def test_sigterm_mid_write_is_handled_like_ctrl_c(b7_checkpoint, tmp_path):
    """SIGTERM (what `kill`, systemd and container runtimes send) unwinds: exit 143, one line, nothing left."""
    out = tmp_path / "b7.pth"
    command = convert_command(b7_checkpoint, out, "--variant", "standard")
    proc, temporary, size = signal_while_writing(command, out, signal.SIGTERM)
    stderr = proc.stderr.read().decode()
    assert 0 < size < B7_OUTPUT_BYTES  # it really was mid-write
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effconv: error: terminated"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, and no hidden temporary either

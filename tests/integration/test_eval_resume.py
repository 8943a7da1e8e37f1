"""effconv eval --predictions: per-image rows written as the run goes, and a run interrupted (a process killed
outright, a torn last line) started again ends with the same totals and the same file as an uninterrupted one."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from effconv.errors import UsageError
from effconv.models import load
from effconv.zoo.evaluation import evaluate
from tests.support.eval_data import BATCH, CLASSES, PER_CLASS, child_env, effconv_command, image_folder, rows, small_b0
from tests.support.zoo_helpers import one_torch_thread

IMAGES = len(CLASSES) * PER_CLASS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(fixture_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return small_b0(fixture_ckpt, root / "b0.pth"), image_folder(root / "val")


@pytest.fixture(scope="module")
def model(setup):
    return load(setup[0])


@pytest.fixture(scope="module")
def uninterrupted(setup, model, tmp_path_factory):
    predictions = tmp_path_factory.mktemp("whole") / "p.jsonl"
    return evaluate(model, setup[1], batch_size=BATCH, predictions=predictions), predictions


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _totals(result) -> tuple:
    return result.images, result.top1, result.top5


def test_a_torn_last_line_is_cut_and_the_rest_resumed(setup, model, uninterrupted, tmp_path):
    whole, whole_file = uninterrupted
    lines = whole_file.read_bytes().splitlines(keepends=True)
    kept = 1 + 5 * BATCH  # the header and five batches, then a row cut short by a kill
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes(b"".join(lines[:kept]) + lines[kept][:25])
    resumed = evaluate(model, setup[1], batch_size=BATCH, predictions=predictions)
    assert _totals(resumed) == _totals(whole)
    assert (resumed.details["resumed"], resumed.details["evaluated"]) == (kept - 1, IMAGES - kept + 1)
    assert predictions.read_bytes() == whole_file.read_bytes()
    assert resumed.details["predictions"] == {"file": str(predictions), "sha256": _sha256(whole_file), "rows": IMAGES}
    again = evaluate(model, setup[1], batch_size=BATCH, predictions=predictions)  # all done: nothing to evaluate
    assert _totals(again) == _totals(whole) and again.details["evaluated"] == 0


def test_csv_rows_hold_the_same_figures(setup, model, uninterrupted, tmp_path):
    predictions = tmp_path / "p.csv"
    result = evaluate(model, setup[1], batch_size=BATCH, limit=2 * BATCH, predictions=predictions)
    with predictions.open() as f:
        assert f.readline().startswith("# effconv eval {")
        table = list(csv.DictReader(f))
    expected = rows(uninterrupted[1])[: 2 * BATCH]
    assert [r["path"] for r in table] == [r["path"] for r in expected] and result.images == 2 * BATCH
    for row, want in zip(table, expected, strict=True):
        assert [int(row[f"pred{i}"]) for i in range(1, 6)] == want["top5"] and int(row["label"]) == want["label"]
        assert [float(row[f"prob{i}"]) for i in range(1, 6)] == want["prob5"]
        assert float(row["logit_max"]) == want["logit_max"] and row["error"] == ""


def test_rows_of_another_run_or_another_file_are_refused(setup, model, uninterrupted, tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes(uninterrupted[1].read_bytes())
    with pytest.raises(UsageError, match="results of another run"):  # other images (--limit)
        evaluate(model, setup[1], batch_size=BATCH, limit=BATCH, predictions=predictions)
    with pytest.raises(UsageError, match="results of another run"):  # another computation
        evaluate(model, setup[1], batch_size=BATCH, predictions=predictions, amp="bf16")
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(lines[:3]) + "{broken\n" + "".join(lines[4:]))
    with pytest.raises(UsageError, match="line 4: not a row"):
        evaluate(model, setup[1], batch_size=BATCH, predictions=predictions)
    precious = tmp_path / "notes.jsonl"
    precious.write_text('{"my": "notes"}\n')
    with pytest.raises(UsageError, match="not a predictions file"):
        evaluate(model, setup[1], predictions=precious)
    assert precious.read_text() == '{"my": "notes"}\n'
    with pytest.raises(UsageError, match=r"\.jsonl .* or \.csv"):
        evaluate(model, setup[1], predictions=tmp_path / "p.txt")


def test_amp_says_it_is_not_the_exact_path(setup, model):
    result = evaluate(model, setup[1], batch_size=BATCH, limit=BATCH, amp="bf16")
    assert result.details["exact"] is False and result.details["amp"] == "bf16"
    assert "not the exact" in result.details["note"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the fourth field of /proc/PID/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _local_rank(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"LOCAL_RANK=")), None)


def _kill_rank_1_after_the_first_rows(process: subprocess.Popen, predictions: Path) -> None:
    deadline = time.monotonic() + 120
    while not (predictions.exists() and predictions.read_bytes().count(b"\n") > 2 * BATCH):  # one step of both
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)
    victim = next(pid for pid in _children(process.pid) if _local_rank(pid) == 1)
    os.kill(victim, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the worker processes through /proc")
def test_a_rank_killed_mid_run_ends_the_run_and_a_resumed_run_ends_the_same(setup, uninterrupted, tmp_path):
    weights, data = setup
    whole, whole_file = uninterrupted
    out, predictions = tmp_path / "r.json", tmp_path / "p.jsonl"
    args = ("eval", "--weights", weights, "--data", data, "--batch-size", BATCH, "--workers", 0, "--out", out,
            "--predictions", predictions, "--nproc", 2, "-q")  # fmt: skip
    process = subprocess.Popen(effconv_command(*args), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _kill_rank_1_after_the_first_rows(process, predictions)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1] == (
        "effconv: error: the process of rank 1 was killed by SIGKILL; the run stopped, no result written"
    )
    assert "Traceback" not in stderr and not out.exists()
    done = len(rows(predictions))
    assert 0 < done < IMAGES and done % (2 * BATCH) == 0  # whole steps of both processes, written by rank 0
    with predictions.open("ab") as f:
        f.write(b'{"path": "439/img0')  # and a line torn by a kill

    again = subprocess.run(effconv_command(*args), cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                           timeout=180)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"{done} from the predictions file" in again.stdout
    result = json.loads(out.read_text())
    assert (result["images"], result["top1"], result["top5"]) == (whole.images, whole.top1, whole.top5)
    assert (result["resumed"], result["evaluated"], result["skipped_count"]) == (done, IMAGES - done, 0)
    assert predictions.read_bytes() == whole_file.read_bytes()
    assert result["predictions"]["sha256"] == _sha256(whole_file)

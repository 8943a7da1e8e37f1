"""effconv eval over torch.distributed (gloo, CPU): one process, two processes, two "machines" agree image by image.

Every run uses batches of 10 over 240 images, so that each process's share (120) is whole batches and every
image is computed in the same batch in every run: then the predictions files are byte for byte the same.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from effconv.models import load
from effconv.zoo import pipelines
from effconv.zoo.distributed import DistributedError, Ranks, _exit_code, largest_share, share
from effconv.zoo.evaluation import evaluate
from tests.support.eval_data import (
    BATCH,
    CLASSES,
    PER_CLASS,
    child_env,
    effconv_command,
    free_port,
    image_folder,
    rows,
    run,
    small_b0,
    torchrun_command,
)
from tests.support.helpers import run_cli
from tests.support.zoo_helpers import one_torch_thread

IMAGES = len(CLASSES) * PER_CLASS


@pytest.fixture(scope="module")
def setup(fixture_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return small_b0(fixture_ckpt, root / "b0.pth"), image_folder(root / "val")


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """The reference: one process, in this one, with its predictions file."""
    weights, data = setup
    predictions = tmp_path_factory.mktemp("one") / "p.jsonl"
    with one_torch_thread():
        result = evaluate(load(weights), data, batch_size=BATCH, predictions=predictions)
    return result, predictions


def _eval_args(weights, data, out, predictions, *extra):
    return ("eval", "--weights", weights, "--data", data, "--batch-size", BATCH, "--workers", 0, "--out", out,
            "--predictions", predictions, "-q", *extra)  # fmt: skip


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_as_single(single, result_json, predictions, processes: int) -> None:
    reference, reference_file = single
    data = json.loads(result_json.read_text())
    assert data["processes"] == processes
    assert (data["images"], data["top1"], data["top5"]) == (reference.images, reference.top1, reference.top5)
    got = rows(predictions)
    assert [r["path"] for r in got] == [r["path"] for r in rows(reference_file)]  # each image once, in order
    assert got == rows(reference_file)  # top-5 classes, probabilities, logit max: bit for bit
    assert _sha256(predictions) == _sha256(reference_file) == data["predictions"]["sha256"]


def test_the_reference_is_a_real_test(single):
    result, predictions = single
    assert result.images == IMAGES == len(rows(predictions))
    assert 0 < result.top1 < result.top5 < 100  # the folders' labels are hit, not all of them
    assert result.details["predictions"]["sha256"] == _sha256(predictions)
    assert result.details["exact"] is True and result.details["amp"] is None


def test_two_processes_give_the_same_predictions(setup, single, tmp_path):
    weights, data = setup
    out, predictions = tmp_path / "r.json", tmp_path / "p.jsonl"
    done = run(effconv_command(*_eval_args(weights, data, out, predictions, "--nproc", 2)), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 processes on cpu" in done.stdout and "Traceback" not in done.stderr
    _same_as_single(single, out, predictions, processes=2)


def test_two_machines_give_the_same_predictions(setup, single, tmp_path):
    """Two torchrun launches meeting at one rendezvous endpoint, as on two machines (--nnodes 2)."""
    weights, data = setup
    out, predictions = tmp_path / "r.json", tmp_path / "p.jsonl"
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ("--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
              "--rdzv-id", f"test-{tmp_path.name}", "-m", "effconv")  # fmt: skip
    command = torchrun_command(*launch, *_eval_args(weights, data, out, predictions))
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum("2 processes on cpu" in stdout for stdout, _ in outputs) == 1  # rank 0 alone reports
    _same_as_single(single, out, predictions, processes=2)


def test_a_bad_image_in_one_rank_stops_every_process(setup, tmp_path):
    weights, _ = setup
    data = image_folder(tmp_path / "val", classes=("1", "2"), per_class=6)
    bad = data / "2" / "zz-broken.jpg"  # sorted last: in rank 1's share
    bad.write_bytes(b"\xff\xd8\xff" + b"not a jpeg at all" * 20)
    out = tmp_path / "r.json"
    args = ("eval", "--weights", weights, "--data", data, "--batch-size", 2, "--workers", 0, "--out", out, "--nproc", 2)
    done = run(effconv_command(*args), tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"effconv: error: cannot read image {bad}"), done.stderr
    assert "--skip-bad" in lines[0] and not out.exists()


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shares_hold_every_image_once(world_size):
    for count in (0, 1, 5, 6, 240, 241):
        items = list(range(count))
        shares = [share(items, Ranks(rank, world_size)) for rank in range(world_size)]
        assert [i for part in shares for i in part] == items  # none repeated, none dropped, in order
        sizes = [len(part) for part in shares]
        assert max(sizes) == largest_share(count, world_size) and max(sizes) - min(sizes) <= 1


def test_the_launcher_reports_the_process_that_was_killed():
    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")

    # rank 1 killed; rank 0 then lost contact (exit 2) and rank 2 was stopped by the launcher (SIGTERM)
    with pytest.raises(DistributedError, match="rank 1 was killed by SIGKILL"):
        _exit_code({0: failure(0, 2), 1: failure(1, -9), 2: failure(2, -15)})
    assert _exit_code({0: failure(0, 2), 1: failure(1, -15)}) == 2  # an error that rank 0 printed itself
    with pytest.raises(DistributedError, match="rank 0 was killed by SIGTERM"):
        _exit_code({0: failure(0, -15), 1: failure(1, -15)})


def test_resizing_on_the_device_gives_the_same_predictions(setup, single, tmp_path, monkeypatch):
    """--resize-on-device (on the CPU here: the torch code a GPU runs) with DataLoader workers: the same bits."""
    weights, data = setup
    predictions = tmp_path / "p.jsonl"
    resized = []

    def counted(crop, settings):
        resized.append(tuple(crop.shape))
        return on_device(crop, settings)

    on_device = pipelines.prepare_on_device
    monkeypatch.setattr(pipelines, "prepare_on_device", counted)
    with one_torch_thread():
        result = evaluate(
            load(weights), data, batch_size=BATCH, predictions=predictions, resize_on_device=True, workers=2
        )
    assert result.details["resize_on_device"] is True
    assert len(resized) == IMAGES and all(shape[2] == 3 for shape in resized)  # every image resized there
    assert rows(predictions) == rows(single[1])
    assert _sha256(predictions) == _sha256(single[1])
    out, cli_predictions = tmp_path / "cli.json", tmp_path / "cli.jsonl"
    with one_torch_thread():  # as the reference: the thread count can change a convolution's rounding
        done = run_cli(*_eval_args(weights, data, out, cli_predictions, "--limit", 30, "--resize-on-device"))
    assert done.exit_code == 0, done.stderr
    assert json.loads(out.read_text())["resize_on_device"] is True
    assert rows(cli_predictions) == rows(single[1])[:30]


def test_unreadable_images_with_resize_on_device(setup, tmp_path):
    """Batches of 2: all readable, one unreadable of two, none readable: the same rows as the CPU path."""
    weights, data = setup
    folder = tmp_path / "val" / "49"
    folder.mkdir(parents=True)
    for i, path in enumerate(sorted((data / "49").iterdir())[:3]):
        (folder / f"img{i}.jpg").write_bytes(path.read_bytes())
    for name in ("img3.jpg", "img4.jpg", "img5.jpg"):
        (folder / name).write_bytes(b"not a jpeg")
    results = {}
    for on_device in (False, True):
        predictions = tmp_path / f"p{on_device}.jsonl"
        with one_torch_thread():
            result = evaluate(load(weights), tmp_path / "val", batch_size=2, predictions=predictions,
                              resize_on_device=on_device, skip_bad=True)  # fmt: skip
        results[on_device] = (result.images, result.details["skipped_count"], rows(predictions))
    assert results[True] == results[False] and results[True][:2] == (3, 3)

"""A small evaluation set for the distributed and resumable `effconv eval` tests, and running effconv apart.

The official-b0 fixture converted for 64 px inputs (fast on two cores), and a few hundred small seeded
JPEGs in class folders named by ImageNet label numbers that the fixture's random b0 often predicts for
them, so that top-1 and top-5 are neither 0 nor 100 %.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from effconv.convert import convert_checkpoint
from effconv.output.artifact import write_artifact

IMAGE_SIZE = 64
CLASSES = ("49", "212", "321", "439", "756", "846")  # labels the random b0 gives these images most
PER_CLASS = 40  # 240 images: 120 per process of two, 12 batches of 10 each
BATCH = 10  # divides every share, so one, two processes and a resumed run see the same batches


def small_b0(fixture_ckpt: Path, out: Path) -> Path:
    result = convert_checkpoint(fixture_ckpt, image_size=IMAGE_SIZE)
    write_artifact(result.state_dict, result.card, out)
    return out


def image_folder(root: Path, classes=CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """Seeded JPEGs of 60-99 px (gradients and noise) in one folder per class."""
    rng = np.random.default_rng(seed)
    for number, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.integers(60, 100, 2)
            ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)
            pixels = ramp + rng.normal(0, 30, (height, width, 3)) + 20 * number
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.jpg", quality=85)
    return root


def child_env() -> dict[str, str]:
    """One thread per process (two cores), and no launcher variables inherited from the test's own process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def effconv_command(*args) -> list[str]:
    return [sys.executable, "-m", "effconv", *map(str, args)]


def torchrun_command(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def run(command: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(path: Path) -> list[dict]:
    """The per-image rows of a JSON Lines predictions file (its first line names the run)."""
    lines = path.read_text().splitlines()
    assert "effconv_eval" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]

"""Conversion speed and memory: effconv vs the TensorFlow route vs a copy-only floor.

For each checkpoint size (default all three: a b7-sized one with raw + EMA copies,
~530 MB, an L2-sized one with only EMA copies, ~1.9 GB, and an EfficientNetV2-L-sized one
with raw + EMA copies, ~950 MB) every contender
runs as a whole process (imports included), interleaved in a rotating order,
several times; the script prints medians of wall time and peak RSS and the
ratios the project's targets are stated in, all measured in the same run.

The parent stays lean (no torch, no TensorFlow): checkpoints are written by a
subprocess, and each measured process is started by a tiny launcher, so its
peak RSS is its own and never inherits the parent's (a forked child's
`ru_maxrss` counts the memory of the process it was forked from). The RSS of a
bare `import torch` is measured too, as a check that the floor's figure is sane.
The load average is printed before each round: other work on the machine shows.

    .venv/bin/python scripts/bench_convert.py                 # all sizes, 5 runs each
    .venv/bin/python scripts/bench_convert.py --size b7 --runs 3 --workdir /tmp/effbench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

PY = sys.executable


@dataclass(frozen=True)
class Size:
    arch: str
    ema_only: bool

    @property
    def label(self) -> str:
        return f"{self.arch} ({'EMA only' if self.ema_only else 'raw + EMA'})"


SIZES = {"b7": Size("b7", ema_only=False), "l2": Size("l2", ema_only=True), "v2-l": Size("v2-l", ema_only=False)}

# Writes the official-format checkpoint, in its own process (TensorFlow, GBs of arrays).
GENERATE = r"""
import sys
from effconv.parity.synth import write_synthetic_checkpoint
write_synthetic_checkpoint(sys.argv[1], sys.argv[2], ema_only=sys.argv[3] == "1", calibrate=False, seed=1)
"""

# Starts one measured process and reports its own wall time, CPU time (user + sys, all threads)
# and peak RSS (kB) as JSON.
LAUNCHER = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
report = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss, "status": status}
print(json.dumps(report | {"stderr": err[-4000:].decode()}))
"""

# The TensorFlow route, as the existing converters do it: TF reads every tensor.
TF_ROUTE = r"""
import sys, numpy as np, tensorflow as tf, torch
reader = tf.train.load_checkpoint(sys.argv[1])
tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
out = {}
for name, a in tensors.items():
    if not name.endswith("/ExponentialMovingAverage"):
        continue
    if a.ndim == 4:
        a = a.transpose(2, 3, 0, 1) if name.find("depthwise") >= 0 else a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:
        a = a.T
    out[name] = torch.from_numpy(np.ascontiguousarray(a))
torch.save(out, sys.argv[2])
"""

# The floor: import torch, then copy as many bytes as the output holds.
FLOOR = r"""
import sys, torch
size = int(sys.argv[3])
with open(sys.argv[1], "rb", buffering=0) as src, open(sys.argv[2], "wb", buffering=0) as dst:
    buf = bytearray(16 << 20)
    left = size
    while left:
        n = src.readinto(memoryview(buf)[: min(len(buf), left)])
        if not n:
            break
        dst.write(memoryview(buf)[:n])
        left -= n
"""

IMPORT_TORCH = "import torch"

# Touches (then frees) N bytes of memory, so that the next process finds that much free memory
# ready for use. On a virtual machine, memory the guest has not touched lately can cost ~10x
# more on first touch (the host backs it lazily): without this, whichever process runs right
# after the TensorFlow route (which touches 4.5 GB at L2 size) would write its output far
# faster than the others, and in a fixed rotation that is always the same contender.
WARM_MEMORY = "import sys; b = bytearray(b'\\x01') * int(sys.argv[1])"


class Run(NamedTuple):
    wall: float  # seconds
    cpu: float  # user + sys seconds, all threads: less disturbed than wall time by other load
    rss: float  # peak RSS, MB


def warm_memory(nbytes: int) -> None:
    subprocess.run([PY, "-c", WARM_MEMORY, str(nbytes)], check=True)


def measure(cmd: list[str], warm_bytes: int = 0) -> Run:
    """Wall and CPU seconds and peak RSS of one whole process, started by the launcher.

    With `warm_bytes`, that much free memory is touched first (see WARM_MEMORY). Every process
    starts with nothing left to write out to disk (`sync`).
    """
    if warm_bytes:
        warm_memory(warm_bytes)
    os.sync()  # no process inherits the disk writing of the one before (its output still being written out)
    line = subprocess.run([PY, "-c", LAUNCHER, *cmd], check=True, capture_output=True, text=True).stdout
    report = json.loads(line)
    if report["status"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{report['stderr']}")
    return Run(report["wall"], report["cpu"], report["maxrss_kb"] / 1024)


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def checkpoint_for(size: Size, work: Path) -> Path:
    ckpt = work / f"{size.arch}{'-ema' if size.ema_only else ''}"
    if not (ckpt / "checkpoint").exists():
        print(f"writing an official-format {size.label} checkpoint to {ckpt} ...", flush=True)
        gen = [PY, "-c", GENERATE, size.arch, str(ckpt), "1" if size.ema_only else "0"]
        done = subprocess.run(gen, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"writing the checkpoint failed:\n{done.stderr[-4000:]}")
    return ckpt


def bench_size(size: Size, work: Path, runs: int) -> dict:
    ckpt = checkpoint_for(size, work)
    data = ckpt / "model.ckpt.data-00000-of-00001"
    out = work / f"out-{size.arch}"
    out.mkdir(exist_ok=True)
    effconv = [PY, "-m", "effconv.cli", "convert", "--src", str(ckpt), "--out", str(out / "effconv.pth")]
    effconv += ["--force", "-q", "--variant", "standard"]
    measure(effconv)  # warms the page cache and gives the output size
    out_size = (out / "effconv.pth").stat().st_size
    contenders = {  # name: (command, the file it writes)
        "effconv": (effconv, out / "effconv.pth"),
        "tensorflow": ([PY, "-c", TF_ROUTE, str(ckpt / "model.ckpt"), str(out / "tf.pth")], out / "tf.pth"),
        "floor": ([PY, "-c", FLOOR, str(data), str(out / "floor.bin"), str(out_size)], out / "floor.bin"),
    }
    # Enough for the hungriest contender (the TensorFlow route holds ~2.4x the checkpoint) and its output.
    warm_bytes = int(2.5 * data.stat().st_size) + out_size
    names = list(contenders)
    results: dict[str, list[Run]] = {k: [] for k in names}
    loads = []
    for i in range(runs):
        loads.append(os.getloadavg()[0])
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no contender always goes first
        for name in order:
            cmd, written = contenders[name]
            written.unlink(missing_ok=True)  # every process writes a new file (replacing one costs more)
            results[name].append(measure(cmd, warm_bytes))
        row = ", ".join(f"{k} {v[-1].wall:.2f}s/{v[-1].cpu:.2f}s cpu/{v[-1].rss:.0f}MB" for k, v in results.items())
        print(f"  run {i + 1}/{runs} ({load_average()}): {row}", flush=True)
    for f in out.iterdir():  # the next size needs the disk and page cache more
        f.unlink()
    med = {k: Run(*(statistics.median(getattr(r, f) for r in v) for f in Run._fields)) for k, v in results.items()}
    out_mb = out_size / 2**20
    budget = out_mb * 1.2 + 300
    tf_ratio = med["tensorflow"].wall / med["effconv"].wall
    floor_ratio = med["effconv"].wall / med["floor"].wall
    return {
        "size": size.label,
        "checkpoint_mb": round(data.stat().st_size / 2**20, 1),
        "output_mb": round(out_mb, 1),
        "runs": runs,
        "load_average_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "median_seconds": {k: round(v.wall, 3) for k, v in med.items()},
        "median_cpu_seconds": {k: round(v.cpu, 3) for k, v in med.items()},
        "median_peak_rss_mb": {k: round(v.rss, 1) for k, v in med.items()},
        "all_seconds": {k: [round(r.wall, 3) for r in v] for k, v in results.items()},
        "tf_over_effconv": round(tf_ratio, 2),
        "effconv_over_floor": round(floor_ratio, 2),
        "cpu_tf_over_effconv": round(med["tensorflow"].cpu / med["effconv"].cpu, 2),
        "cpu_effconv_over_floor": round(med["effconv"].cpu / med["floor"].cpu, 2),
        "rss_budget_mb": round(budget, 1),
        "targets_met": {
            "2x_faster_than_tf": tf_ratio >= 2,
            "within_1.5x_of_floor": floor_ratio <= 1.5,
            "rss_within_budget": med["effconv"].rss <= budget,
        },
    }


def print_figures(fig: dict, torch_rss: float) -> None:
    load = fig["load_average_1min"]
    print(
        f"\n{fig['size']}: checkpoint {fig['checkpoint_mb']:.0f} MB, output {fig['output_mb']:.0f} MB, "
        f"medians of {fig['runs']} runs (1-min load average {load['min']:.2f}..{load['max']:.2f})"
    )
    print(f"{'process':<12}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>14}")
    for k in fig["median_seconds"]:
        wall, cpu, rss = fig["median_seconds"][k], fig["median_cpu_seconds"][k], fig["median_peak_rss_mb"][k]
        print(f"{k:<12}{wall:>9.2f}{cpu:>9.2f}{rss:>14.0f}")
    met = {k: "met" if v else "MISSED" for k, v in fig["targets_met"].items()}
    print(
        f"TF route / effconv = {fig['tf_over_effconv']:.2f}x wall, {fig['cpu_tf_over_effconv']:.2f}x CPU "
        f"(target >= 2: {met['2x_faster_than_tf']})"
    )
    print(
        f"effconv / floor    = {fig['effconv_over_floor']:.2f}x wall, {fig['cpu_effconv_over_floor']:.2f}x CPU "
        f"(target <= 1.5: {met['within_1.5x_of_floor']})"
    )
    rss = fig["median_peak_rss_mb"]["effconv"]
    print(f"effconv peak RSS   = {rss:.0f} MB (budget {fig['rss_budget_mb']:.0f} MB: {met['rss_within_budget']})")
    if fig["median_peak_rss_mb"]["floor"] > torch_rss + 64:
        print(f"warning: the floor's RSS is far above a bare import torch ({torch_rss:.0f} MB): RSS is mis-measured")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default: b7, l2, v2-l")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="effconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"{load_average()}, {os.cpu_count()} CPUs", flush=True)
        torch_rss = statistics.median(measure([PY, "-c", IMPORT_TORCH]).rss for _ in range(3))
        print(f"peak RSS of a bare `import torch`: {torch_rss:.0f} MB", flush=True)
        figures = []
        for name in args.size or ["b7", "l2", "v2-l"]:
            print(f"\n== {SIZES[name].label}", flush=True)
            figures.append(bench_size(SIZES[name], work, args.runs))
        for fig in figures:
            print_figures(fig, torch_rss)
        if args.json:
            report = {"cpus": os.cpu_count(), "import_torch_rss_mb": round(torch_rss, 1), "sizes": figures}
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

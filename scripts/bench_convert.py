"""Conversion speed and memory: effconv vs the TensorFlow route vs a copy-only floor.

Each contender runs as a whole process (imports included), interleaved, several
times; the script prints medians of wall time and peak RSS and the ratios the
project's targets are stated in. Usage:

    .venv/bin/python scripts/bench_convert.py                # b7-sized, raw + EMA (~530 MB)
    .venv/bin/python scripts/bench_convert.py --arch l2 --ema-only   # ~1.9 GB
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

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


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="b7")
    ap.add_argument("--ema-only", action="store_true", help="checkpoint with only EMA copies (like L2 releases)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", help="keep the checkpoint here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="effconv-bench-"))
    ckpt = work / f"{args.arch}{'-ema' if args.ema_only else ''}"
    try:
        if not (ckpt / "checkpoint").exists():
            print(f"writing an official-format {args.arch} checkpoint to {ckpt} ...", flush=True)
            from effconv.synth import write_synthetic_checkpoint

            write_synthetic_checkpoint(args.arch, ckpt, ema_only=args.ema_only, calibrate=False, seed=1)
        data = ckpt / "model.ckpt.data-00000-of-00001"
        out = work / "out"
        out.mkdir(exist_ok=True)
        effconv = [PY, "-m", "effconv.cli", "convert", "--src", str(ckpt), "--out", str(out / "effconv.pth")]
        effconv += ["--force", "-q", "--variant", "standard"]
        subprocess.run(effconv, check=True, capture_output=True)  # warm the page cache, learn the output size
        out_size = (out / "effconv.pth").stat().st_size
        contenders = {
            "effconv": effconv,
            "tensorflow": [PY, "-c", TF_ROUTE, str(ckpt / "model.ckpt"), str(out / "tf.pth")],
            "floor": [PY, "-c", FLOOR, str(data), str(out / "floor.bin"), str(out_size)],
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for i in range(args.runs):
            for name, cmd in contenders.items():
                results[name].append(run(cmd))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in results.items()))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
        data_mb = data.stat().st_size / 2**20
        out_mb = out_size / 2**20
        budget = out_mb * 1.2 + 300
        figures = {
            "arch": args.arch,
            "checkpoint_mb": round(data_mb, 1),
            "output_mb": round(out_mb, 1),
            "runs": args.runs,
            "median_seconds": {k: round(v[0], 3) for k, v in med.items()},
            "median_peak_rss_mb": {k: round(v[1], 1) for k, v in med.items()},
            "tf_over_effconv": round(med["tensorflow"][0] / med["effconv"][0], 2),
            "effconv_over_floor": round(med["effconv"][0] / med["floor"][0], 2),
            "rss_budget_mb": round(budget, 1),
        }
        print(
            f"\ncheckpoint {data_mb:.0f} MB ({args.arch}, {'EMA only' if args.ema_only else 'raw + EMA'}), "
            f"output {out_mb:.0f} MB, medians of {args.runs} runs"
        )
        print(f"{'process':<12}{'wall s':>9}{'peak RSS MB':>14}")
        for k, (w, r) in med.items():
            print(f"{k:<12}{w:>9.2f}{r:>14.0f}")
        ok_tf = figures["tf_over_effconv"] >= 2
        ok_floor = figures["effconv_over_floor"] <= 1.5
        ok_rss = med["effconv"][1] <= budget
        print(f"TF route / effconv = {figures['tf_over_effconv']:.2f}x (target >= 2: {'met' if ok_tf else 'MISSED'})")
        print(
            f"effconv / floor    = {figures['effconv_over_floor']:.2f}x (target <= 1.5: "
            f"{'met' if ok_floor else 'MISSED'})"
        )
        print(
            f"effconv peak RSS   = {med['effconv'][1]:.0f} MB (budget {budget:.0f} MB: {'met' if ok_rss else 'MISSED'})"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""CI parity matrix: every architecture, synthesised, converted and verified with the CLI.

For each arch: `effconv synth` writes an official-format checkpoint, `effconv
convert` turns it into a .pth, and `effconv verify` compares TensorFlow and
PyTorch at the native resolution and at an odd one, per layer. The combined
report lands in reports/parity.{md,json,xml}. Exit 1 when any arch fails.

    .venv/bin/python scripts/parity_matrix.py [--archs b0,b3] [--out reports]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from effconv.models.spec import ARCH_NAMES, get_arch
from effconv.parity.reports import to_junit, to_markdown

# Big archs run batch 1 to fit CI's 2 cores (said in the report); L2's odd size is 475, the
# size of its released fine-tuned checkpoint.
BATCH = {"b6": 1, "b7": 1, "b8": 1, "l2": 1}
SIZES = {"l2": (800, 475)}
EMA_ONLY = {"l2"}  # like the released L2 checkpoints; also halves the 3.8 GB raw + EMA file


def sizes_for(arch: str) -> tuple[int, int]:
    native = get_arch(arch).resolution
    return SIZES.get(arch, (native, native - 31 if native % 2 == 0 else native - 32))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effconv.cli", *args], capture_output=True, text=True)


def run_arch(arch: str, work: Path) -> tuple[dict | None, str]:
    ckpt, out = work / f"efficientnet-{arch}", work / f"{arch}.pth"
    synth = ["synth", "--arch", arch, "--out", str(ckpt), "--seed", "7"]
    steps = [
        synth + (["--ema-only"] if arch in EMA_ONLY else []),
        ["convert", "--src", str(ckpt), "--out", str(out), "--variant", "standard", "-q"],
    ]
    for step in steps:
        proc = cli(*step)
        if proc.returncode != 0:
            return None, f"`effconv {step[0]}` failed: {proc.stderr.strip().splitlines()[-1:]}"
    native, odd = sizes_for(arch)
    report = work / f"{arch}.json"
    proc = cli(
        "verify", "--src", str(ckpt), "--weights", str(out), "--per-layer", "-q",
        "--batch", str(BATCH.get(arch, 2)), "--input-size", str(native), "--input-size", str(odd),
        "--report", str(report),
    )  # fmt: skip
    shutil.rmtree(ckpt, ignore_errors=True)
    out.unlink(missing_ok=True)
    if proc.returncode not in (0, 1) or not report.exists():
        return None, f"`effconv verify` failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(report.read_text()), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCH_NAMES))
    ap.add_argument("--out", default="reports")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports, errors, started = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effconv-parity-") as tmp:
        for arch in archs:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - started:6.0f}s] {arch}: synth, convert, verify ...", flush=True)
            report, error = run_arch(arch, Path(tmp))
            if report is None:
                errors.append(f"{arch}: {error}")
                print(f"    ERROR {error}", flush=True)
                continue
            reports.append(report)
            for c in report["cases"]:
                status = "PASS" if c["passed"] else f"FAIL (first divergent {c['first_divergent']})"
                print(f"    {c['name']:<10} {c['input']:<38} max|d| {c['logits']['max_abs']:.3g}  {status}")
            print(f"    {time.perf_counter() - t0:.0f} s", flush=True)
    notes = [
        "Checkpoints are synthetic, written by `effconv synth` in the official format (raw + EMA; L2 EMA only).",
        "Each arch is checked at its native size and an odd size (native - 31; L2: 475, its released "
        "fine-tuning size); b0-b5 use batch 2, b6-b8 and L2 batch 1 to fit CI's 2 cores.",
        *errors,
    ]
    if reports:
        reports[0]["notes"] = notes
    total_s = time.perf_counter() - started
    (out / "parity.json").write_text(json.dumps({"reports": reports, "errors": errors, "seconds": total_s}, indent=2))
    (out / "parity.md").write_text(to_markdown(reports, "effconv parity matrix") + f"\nTotal {total_s:.0f} s.\n")
    (out / "parity.xml").write_text(to_junit(reports))
    failed = errors or [c for r in reports for c in r["cases"] if not c["passed"]]
    print((out / "parity.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

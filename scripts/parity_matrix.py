"""CI parity matrix: every architecture, synthesised, converted and verified with the CLI.

For each arch: `effconv synth` writes an official-format checkpoint, `effconv
convert` turns it into a .pth, and `effconv verify` compares TensorFlow and
PyTorch at the native resolution and at an odd one, per layer. For b0 and b3,
`effconv eval --against-tf` then runs scikit-image's bundled sample photographs
through both frameworks, each with its own preprocessing (TensorFlow's ops,
effconv's pipeline), and compares them image by image. The combined report
lands in reports/parity.{md,json,xml}. Exit 1 when any arch fails.

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
from effconv.zoo.against_tf import markdown_table, summary_lines

# Big archs run batch 1 to fit CI's 2 cores (said in the report); L2's odd size is 475, the
# size of its released fine-tuned checkpoint.
BATCH = {"b6": 1, "b7": 1, "b8": 1, "l2": 1, "v2-m": 1, "v2-l": 1, "v2-xl": 1}
SIZES = {"l2": (800, 475)}
EMA_ONLY = {"l2", "v2-xl"}  # like the released L2 checkpoints; also halves the 3.8 GB raw + EMA file
AGAINST_TF = ("b0", "b3")  # `effconv eval --against-tf` on the photographs below (about 10 s each on 2 cores)
# scikit-image's bundled photographs with an ImageNet class, labelled by its WordNet id (the synthesised
# checkpoints have 1000 classes); each is written as JPEG and, mirrored, as PNG: both decoders are compared.
PHOTOS = {"chelsea": "n02123045", "coffee": "n07920052", "rocket": "n03773504"}  # tabby, espresso, missile


def sizes_for(arch: str) -> tuple[int, int]:
    native = get_arch(arch).resolution
    return SIZES.get(arch, (native, native - 31 if native % 2 == 0 else native - 32))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effconv.cli", *args], capture_output=True, text=True)


def write_photos(folder: Path) -> Path:
    """The sample photographs as an evaluation folder (flat, JPEG + mirrored PNG); returns its labels file."""
    from PIL import Image
    from skimage import data

    folder.mkdir()
    lines = []
    for name, wnid in PHOTOS.items():
        pixels = getattr(data, name)()
        Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=90)
        Image.fromarray(pixels[:, ::-1].copy()).save(folder / f"{name}-mirror.png")
        lines += [f"{name}.jpg {wnid}", f"{name}-mirror.png {wnid}"]
    labels = folder.with_name("photos-labels.txt")
    labels.write_text("\n".join(lines) + "\n")
    return labels


def against_tf(arch: str, ckpt: Path, weights: Path, photos: Path, work: Path) -> tuple[dict | None, str]:
    """`effconv eval --against-tf` of the converted file on the photographs: (its JSON result, error)."""
    result = work / f"{arch}-eval.json"
    labels = photos.with_name("photos-labels.txt")
    proc = cli(
        "eval", "--weights", str(weights), "--data", str(photos), "--labels", str(labels), "--against-tf",
        "--src", str(ckpt), "--out", str(result), "--batch-size", "3", "--workers", "0", "-q",
    )  # fmt: skip
    if proc.returncode not in (0, 1) or not result.exists():
        return None, f"`effconv eval --against-tf` failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(result.read_text()), ""


def run_arch(arch: str, work: Path, photos: Path | None) -> tuple[dict | None, dict | None, str]:
    """(verify's report, eval --against-tf's result or None, error)."""
    ckpt, out = work / f"efficientnet-{arch}", work / f"{arch}.pth"
    synth = ["synth", "--arch", arch, "--out", str(ckpt), "--seed", "7"]
    steps = [
        synth + (["--ema-only"] if arch in EMA_ONLY else []),
        ["convert", "--src", str(ckpt), "--out", str(out), "--variant", "standard", "-q"],
    ]
    for step in steps:
        proc = cli(*step)
        if proc.returncode != 0:
            return None, None, f"`effconv {step[0]}` failed: {proc.stderr.strip().splitlines()[-1:]}"
    native, odd = sizes_for(arch)
    report = work / f"{arch}-verify.json"  # not {arch}.json: that is the card beside {arch}.pth
    proc = cli(
        "verify", "--src", str(ckpt), "--weights", str(out), "--per-layer", "-q",
        "--batch", str(BATCH.get(arch, 2)), "--input-size", str(native), "--input-size", str(odd),
        "--report", str(report),
    )  # fmt: skip
    evaluated, error = against_tf(arch, ckpt, out, photos, work) if photos and arch in AGAINST_TF else (None, "")
    shutil.rmtree(ckpt, ignore_errors=True)
    out.unlink(missing_ok=True)
    if proc.returncode not in (0, 1) or not report.exists():
        return None, evaluated, f"`effconv verify` failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(report.read_text()), evaluated, error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCH_NAMES))
    ap.add_argument("--out", default="reports")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports, evaluations, errors, started = [], [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effconv-parity-") as tmp:
        photos = Path(tmp) / "photos"
        if any(arch in AGAINST_TF for arch in archs):
            write_photos(photos)
        for arch in archs:
            t0 = time.perf_counter()
            steps = "synth, convert, verify" + (", eval --against-tf" if arch in AGAINST_TF else "")
            print(f"[{time.perf_counter() - started:6.0f}s] {arch}: {steps} ...", flush=True)
            report, evaluated, error = run_arch(arch, Path(tmp), photos)
            if evaluated is not None:
                evaluations.append(evaluated)
                for line in summary_lines(evaluated["against_tf"]):
                    print(f"    {line}")
            if error:
                errors.append(f"{arch}: {error}")
                print(f"    ERROR {error}", flush=True)
            if report is None:
                continue
            reports.append(report)
            for c in report["cases"]:
                status = "PASS" if c["passed"] else f"FAIL (first divergent {c['first_divergent']})"
                print(f"    {c['name']:<10} {c['input']:<38} max|d| {c['logits']['max_abs']:.3g}  {status}")
            print(f"    {time.perf_counter() - t0:.0f} s", flush=True)
    notes = [
        "Checkpoints are synthetic, written by `effconv synth` in the official format (raw + EMA; L2 EMA only).",
        "Each arch is checked at its native size and an odd size (native - 31; L2: 475, its released "
        "fine-tuning size); b6-b8, L2 and V2 M/L/XL use batch 1 to fit CI's 2 cores, the others batch 2.",
        *errors,
    ]
    if reports:
        reports[0]["notes"] = notes
    total_s = time.perf_counter() - started
    summary = {"reports": reports, "against_tf": evaluations, "errors": errors, "seconds": total_s}
    (out / "parity.json").write_text(json.dumps(summary, indent=2))
    markdown = to_markdown(reports, "effconv parity matrix") + against_tf_section(evaluations)
    (out / "parity.md").write_text(markdown + f"\nTotal {total_s:.0f} s.\n")
    (out / "parity.xml").write_text(to_junit(reports))
    failed = errors or [c for r in reports for c in r["cases"] if not c["passed"]]
    failed = failed or [e for e in evaluations if not e["against_tf"]["passed"]]
    print((out / "parity.md").read_text())
    return 1 if failed else 0


def against_tf_section(evaluations: list[dict]) -> str:
    if not evaluations:
        return ""
    names = ", ".join(PHOTOS)
    return "\n".join(
        [
            "",
            "## Real images: `effconv eval --against-tf`",
            "",
            f"scikit-image's sample photographs ({names}: JPEG, and mirrored as PNG), each preprocessed by "
            "TensorFlow's own ops for the TF reference model and by effconv's pipeline for the converted file. The "
            "synthesised checkpoints have random weights (logits far larger than a trained network's), so the "
            "accuracy columns show only that both frameworks count alike. p99.9: the 99.9th percentile of the "
            "per-image max |logit difference|; beyond tolerance: images over `effconv verify`'s limit "
            "(1e-3 + 1e-4 x max |TF logit| per image).",
            "",
            markdown_table(evaluations),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation speed: effconv's preprocessing against TensorFlow's official pipeline and PIL, per core.

Section "preprocessing" (`bench_preprocessing`): images/s of one core from JPEG bytes to the model's input, at each
size, in one process, on the same generated JPEGs (500x375, 4:2:0, quality 90, like ImageNet's validation set):
  effconv          `effconv.zoo.preprocess.preprocess` (simplejpeg decode, official crop, TF1 bicubic on the CPU,
                   mean/std): normalised 3xSxS float32, what `effconv eval` feeds the model
  effconv-raw      the same without mean/std (0-255 floats), like the official input pipeline's output
  effconv-torch    `decode_and_crop` then `preprocess_crop_torch` on CPU tensors (the `--resize-on-device` code)
  effconv-ref      the plain numpy resize that effconv used before (one tap at a time), for comparison
  tf-official      the official input pipeline: tf.data in graph mode, `extract_jpeg_shape`,
                   `decode_and_crop_jpeg` and `tf.compat.v1.image.resize_bicubic`, batched in the graph (the
                   model normalises); intra-op, inter-op and tf.data threads 1
  pil              PIL decode, crop, resize(BICUBIC), float32 array (not TF's pixels: a familiar floor)
Before timing, effconv's and effconv-torch's outputs are compared with TensorFlow's ops on every image and size
(decode_jpeg, crop, resize_bicubic, mean/std): the largest difference is printed and must be 0.

Per core: one thread everywhere (BLAS, torch, TF), and images/s counts the process's CPU seconds (all its
threads), so that other work on a shared machine slows the wall clock, not the figure; wall-clock images/s is
printed too. Warm-up, then rounds; in each round every contender runs about --seconds / --rounds, in a rotating
order; the figure is the median over rounds. Ratios are against tf-official in the same run.

    .venv/bin/python scripts/bench_eval.py                        # 224, 300, 600, 800 px, ~2 min
    .venv/bin/python scripts/bench_eval.py --sizes 224,600 --seconds 2 --json prep.json

Section "eval" (`bench_end_to_end`): images/s of `effconv eval` end to end (the whole process) for a synthesised
b0 at 224 px and b3 at 300 px on --eval-images generated JPEGs, with 1 and 2 processes (`--nproc`), each process
given cores / processes threads (this section needs TensorFlow for `effconv synth`).

More sections append a function to SECTIONS that takes the parsed arguments and returns rows, and their own
options to `add_arguments`.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
    os.environ.setdefault(_name, "1")  # per core: before numpy, torch or TensorFlow start their thread pools
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from effconv.variants import CROP_PADDING, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

DEFAULT_SIZES = (224, 300, 600, 800)
BASELINE = "tf-official"


# ---- inputs ----------------------------------------------------------------------------------------------------


def make_jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth random colour fields with edges and grain, 4:2:0 at quality 90 (PIL's default)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            box = [x0, y0, x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 150))]
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ---- contenders ------------------------------------------------------------------------------------------------


def effconv_numpy(size: int, normalise: bool = True) -> Callable[[bytes], np.ndarray]:
    from effconv.zoo.preprocess import preprocess

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalise else (None, None)

    def run(data: bytes) -> np.ndarray:
        return np.ascontiguousarray(preprocess(data, size, mean, std).transpose(2, 0, 1))  # as eval's `prepare`

    return run


def effconv_torch(size: int) -> Callable[[bytes], np.ndarray]:
    import torch

    from effconv.zoo.preprocess import decode_and_crop, preprocess_crop_torch

    def run(data: bytes):
        return preprocess_crop_torch(torch.from_numpy(decode_and_crop(data, size)), size)

    return run


def effconv_reference(size: int) -> Callable[[bytes], np.ndarray]:
    from effconv.zoo import legacy_bicubic
    from effconv.zoo.preprocess import decode_and_crop, normalize

    def run(data: bytes) -> np.ndarray:
        resized = legacy_bicubic.resize_reference(decode_and_crop(data, size, copy=False), size, size)
        return np.ascontiguousarray(normalize(resized, IMAGENET_MEAN, IMAGENET_STD).transpose(2, 0, 1))

    return run


def pil(size: int) -> Callable[[bytes], np.ndarray]:
    from PIL import Image

    from effconv.zoo.preprocess import crop_offsets, crop_size

    def run(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        crop = crop_size(rgb.height, rgb.width, size)
        top, left = crop_offsets(rgb.height, rgb.width, crop)
        resized = rgb.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))
        return np.asarray(resized, dtype=np.float32)

    return run


def _tensorflow():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def official_decode_and_crop(tf, contents, size: int):
    """The official `_decode_and_center_crop` + resize of the TPU repo's preprocessing (eval branch)."""
    shape = tf.image.extract_jpeg_shape(contents)
    height, width = shape[0], shape[1]
    crop = tf.cast(size / (size + CROP_PADDING) * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    window = tf.stack([((height - crop) + 1) // 2, ((width - crop) + 1) // 2, crop, crop])
    image = tf.image.decode_and_crop_jpeg(contents, window, channels=3)
    return tf.compat.v1.image.resize_bicubic([image], [size, size])[0]


def tf_official(jpegs: list[bytes], size: int, batch: int) -> Callable[[], int]:
    """A tf.data iterator over the JPEGs, one batch of `batch` images per call; returns the images it made."""
    tf = _tensorflow()
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    dataset = (
        tf.data.Dataset.from_tensor_slices(jpegs)
        .repeat()
        .map(lambda contents: official_decode_and_crop(tf, contents, size))
        .batch(batch)
        .with_options(options)
    )
    iterator = iter(dataset)

    def run() -> int:
        next(iterator)
        return batch

    return run


def tf_reference(data: bytes, size: int) -> np.ndarray:
    """TF's ops on the whole decoded image (decode_jpeg, slice, resize_bicubic, mean/std): what effconv matches.

    (`decode_and_crop_jpeg` can differ from decode-then-slice by a few levels in a crop's edge rows for 4:2:0
    JPEGs, so exactness is checked against the slice, as the tests do.)
    """
    tf = _tensorflow()
    image = tf.io.decode_jpeg(data, channels=3)
    height, width = int(image.shape[0]), int(image.shape[1])
    crop = int(tf.cast(size / (size + CROP_PADDING) * tf.cast(min(height, width), tf.float32), tf.int32))
    top, left = ((height - crop) + 1) // 2, ((width - crop) + 1) // 2
    resized = tf.compat.v1.image.resize_bicubic(image[None, top : top + crop, left : left + crop], [size, size])[0]
    normalised = (resized - tf.constant(IMAGENET_MEAN, tf.float32)) / tf.constant(IMAGENET_STD, tf.float32)
    return normalised.numpy().transpose(2, 0, 1)


# ---- timing ----------------------------------------------------------------------------------------------------


def per_image(fn: Callable, jpegs: list[bytes]) -> Callable[[], int]:
    state = {"i": 0}

    def run() -> int:
        fn(jpegs[state["i"] % len(jpegs)])
        state["i"] += 1
        return 1

    return run


def time_chunk(run: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of `run` over about `seconds`."""
    images = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while True:
        images += run()
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    cpu = max(time.process_time() - cpu0, 1e-9)
    return images / cpu, images / wall


def measure(contenders: dict[str, Callable[[], int]], seconds: float, rounds: int) -> dict[str, dict]:
    for run in contenders.values():  # warm-up: first calls build graphs, caches, allocator pools
        time_chunk(run, min(0.3, seconds / rounds))
    cpu_rates: dict[str, list[float]] = {name: [] for name in contenders}
    wall_rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cpu_rate, wall_rate = time_chunk(contenders[name], seconds / rounds)
            cpu_rates[name].append(cpu_rate)
            wall_rates[name].append(wall_rate)
    return {
        name: {
            "images_per_cpu_s": statistics.median(cpu_rates[name]),
            "images_per_wall_s": statistics.median(wall_rates[name]),
            "rounds_per_cpu_s": [round(v, 1) for v in cpu_rates[name]],
        }
        for name in names
    }


# ---- section: preprocessing ------------------------------------------------------------------------------------


def check_exact(jpegs: list[bytes], size: int, with_torch: bool) -> float:
    """Largest |effconv - TF| over the images (numpy path, and torch path if timed), on the normalised scale."""
    worst = 0.0
    for data in jpegs:
        theirs = tf_reference(data, size)
        outputs = [effconv_numpy(size)(data)]
        if with_torch:
            outputs.append(effconv_torch(size)(data).numpy())
        for ours in outputs:
            worst = max(worst, float(np.abs(ours.astype(np.float64) - theirs).max()))
    return worst


def make_contenders(jpegs: list[bytes], size: int, tf_batch: int, skip: set[str]) -> dict[str, Callable[[], int]]:
    makers = {
        "effconv": lambda: per_image(effconv_numpy(size), jpegs),
        "effconv-raw": lambda: per_image(effconv_numpy(size, normalise=False), jpegs),
        "effconv-torch": lambda: per_image(effconv_torch(size), jpegs),
        "effconv-ref": lambda: per_image(effconv_reference(size), jpegs),
        BASELINE: lambda: tf_official(jpegs, size, tf_batch),
        "pil": lambda: per_image(pil(size), jpegs),
    }
    return {name: make() for name, make in makers.items() if name not in skip or name == BASELINE}


def bench_preprocessing(args: argparse.Namespace) -> list[dict]:
    """One row per size and contender: images/s per core, wall images/s, ratio to tf-official, exactness."""
    import torch

    from effconv.zoo import legacy_bicubic

    torch.set_num_threads(1)
    jpegs = make_jpegs(args.images)
    skip = set(args.skip or ())
    print(
        f"preprocessing: {len(jpegs)} JPEGs 500x375, effconv's CPU resize: {legacy_bicubic.kernel_name()}, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = []
    for size in args.sizes:
        worst = check_exact(jpegs, size, "effconv-torch" not in skip)
        contenders = make_contenders(jpegs, size, args.tf_batch, skip)
        figures = measure(contenders, args.seconds, args.rounds)
        base = figures[BASELINE]["images_per_cpu_s"]
        for name, fig in figures.items():
            rows.append(
                {
                    "section": "preprocessing",
                    "size": size,
                    "contender": name,
                    "images_per_cpu_s": round(fig["images_per_cpu_s"], 1),
                    "images_per_wall_s": round(fig["images_per_wall_s"], 1),
                    "ratio_to_tf": round(fig["images_per_cpu_s"] / base, 2),
                    "max_abs_diff_to_tf": worst if name in ("effconv", "effconv-torch") else None,
                    "rounds_per_cpu_s": fig["rounds_per_cpu_s"],
                }
            )
        print_rows([r for r in rows if r["size"] == size])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        diff = "" if r["max_abs_diff_to_tf"] is None else f"   max|diff| to TF {r['max_abs_diff_to_tf']:g}"
        print(
            f"  {r['size']:>4} px  {r['contender']:<14} {r['images_per_cpu_s']:>8.1f} img/s per core"
            f"  ({r['images_per_wall_s']:>7.1f} wall)   x{r['ratio_to_tf']:.2f} of {BASELINE}{diff}",
            flush=True,
        )


def print_summary(rows: list[dict]) -> None:
    """The table: images/s per core of every contender at every size, with its ratio to tf-official."""
    sizes = sorted({r["size"] for r in rows})
    order = ("effconv", "effconv-raw", "effconv-torch", "effconv-ref", BASELINE, "pil")
    names = [n for n in order if any(r["contender"] == n for r in rows)]
    cell = {(r["size"], r["contender"]): r for r in rows}
    print("\nimages/s per core (ratio to tf-official)")
    print("| size | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for size in sizes:
        cells = [f"{cell[size, n]['images_per_cpu_s']:.0f} ({cell[size, n]['ratio_to_tf']:.2f})" for n in names]
        print(f"| {size} | " + " | ".join(cells) + " |")


# ---- section "eval": end-to-end `effconv eval` -------------------------------------------------------------------

END_TO_END = (("b0", 224), ("b3", 300))  # (arch, input size): synthesised weights, the native size


def _labelled_folder(root: Path, count: int) -> Path:
    """`count` generated 500x375 JPEGs in four class folders (the labels do not matter for speed)."""
    for i, data in enumerate(make_jpegs(count, seed=7)):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(data)
    return root


def _effconv(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "effconv", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"effconv {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def bench_end_to_end(args: argparse.Namespace) -> list[dict]:
    """Images/s of `effconv eval` as a user runs it (the whole process: start-up, decode, preprocess, model),
    with 1 and with 2 processes (`--nproc 2`), each process given cores / processes threads."""
    rows: list[dict] = []
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="effconv-bench-eval-") as tmp:
        work = Path(tmp)
        data = _labelled_folder(work / "images", args.eval_images)
        for arch, size in END_TO_END:
            print(f"\n== effconv eval, {arch} at {size} px, {args.eval_images} JPEGs of 500x375", flush=True)
            _effconv("synth", "--arch", arch, "--out", str(work / arch), "--num-classes", "4", "--seed", "3")
            weights = work / f"{arch}.pth"
            _effconv("convert", "--src", str(work / arch), "--out", str(weights), "-q", "--variant", "standard")
            for nproc in args.eval_nproc:
                threads = str(max(1, cores // nproc))
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                out = work / f"{arch}-{nproc}.json"
                cmd = ["eval", "--weights", str(weights), "--data", str(data), "--device", "cpu", "--out", str(out)]
                cmd += ["--batch-size", "16", "--force", "--nproc", str(nproc)]
                start = time.perf_counter()
                _effconv(*cmd, env=env)
                wall = time.perf_counter() - start
                result = json.loads(out.read_text())
                count = result.get("images") or result.get("count") or args.eval_images
                rows.append(
                    {
                        "section": "eval",
                        "arch": arch,
                        "size": size,
                        "processes": nproc,
                        "threads_per_process": int(threads),
                        "images": count,
                        "seconds": round(wall, 2),
                        "images_per_s": round(args.eval_images / wall, 2),
                    }
                )
                print(f"  {nproc} process(es) x {threads} thread(s): {args.eval_images / wall:6.1f} img/s", flush=True)
    return rows


def print_end_to_end(rows: list[dict]) -> None:
    print("\neffconv eval, images/s end to end (whole process; CPU)")
    print("| arch | size | " + " | ".join(f"{n} proc" for n in sorted({r["processes"] for r in rows})) + " |")
    for arch, size in END_TO_END:
        cells = [f"{r['images_per_s']:.1f}" for r in rows if r["arch"] == arch]
        if cells:
            print(f"| {arch} | {size} | " + " | ".join(cells) + " |")


SECTIONS: list[tuple[str, Callable[[argparse.Namespace], list[dict]], Callable[[list[dict]], None]]] = [
    ("preprocessing", bench_preprocessing, print_summary),
    ("eval", bench_end_to_end, print_end_to_end),
]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=list(DEFAULT_SIZES),
        help="comma-separated output sizes (default 224,300,600,800)",
    )
    ap.add_argument("--images", type=int, default=16, help="distinct generated JPEGs, cycled (default 16)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per contender and size (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds the seconds are split into (default 5)")
    ap.add_argument("--tf-batch", type=int, default=16, help="batch of the tf.data pipeline (default 16)")
    ap.add_argument(
        "--skip",
        type=lambda text: text.split(","),
        help="contenders to leave out, comma-separated: effconv-raw, effconv-torch, effconv-ref, pil (not tf-official)",
    )
    ap.add_argument(
        "--section", action="append", choices=[name for name, _, _ in SECTIONS], help="repeatable; default all"
    )
    ap.add_argument("--eval-images", type=int, default=96, help="JPEGs for the eval section (default 96)")
    ap.add_argument(
        "--eval-nproc",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[1, 2],
        help="process counts of the eval section, comma-separated (default 1,2)",
    )
    ap.add_argument("--json", help="also write every row to this file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args()
    if any(s < 1 for s in args.sizes) or args.images < 1 or args.seconds <= 0 or args.rounds < 1:
        ap.error("--sizes, --images and --rounds must be positive, --seconds above 0")
    rows: list[dict] = []
    for name, bench, summary in SECTIONS:
        if args.section and name not in args.section:
            continue
        section_rows = bench(args)
        summary(section_rows)
        rows += section_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())

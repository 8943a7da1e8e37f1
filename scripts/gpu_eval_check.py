"""GPU check of `effconv eval` (issue 14): a synthesised b7 and l2 at their native sizes (600, 800 px) on a few
hundred generated JPEGs, one process, the exact path and the AMP path: images/s, peak GPU memory, and agreement
with the CPU path's predictions.

For each arch:
  weights     `effconv synth` + `effconv convert` where TensorFlow is installed; otherwise (a GPU machine
              without TensorFlow) effconv's model with random He-style weights whose batch-norm statistics
              are calibrated on a batch of the generated images at the native size, the residual branches'
              last BN scaled by 0.25 and the classifier scaled to logits of std 2, as `effconv synth` does it
              in TensorFlow (the output says which);
  cpu         `evaluate` on the CPU, the first --cpu-images images: the reference predictions;
  exact       `evaluate` on --device, float32, TF32 off, after a warm-up batch: images/s end to end
              (decode + preprocessing in --workers DataLoader workers + model), peak GPU memory;
  amp         the same with --amp (bf16 by default);
  on_device   the exact path with --resize-on-device (decode and crop on the workers, the resize on the GPU):
              its predictions must equal the exact path's, and its input the CPU path's bit for bit;
  model-only  the model alone on a device-resident random batch, exact and AMP: what the GPU could do if the
              preprocessing kept up;
  torchrun    `torchrun --standalone --nproc-per-node 1 -m effconv eval` on the first batches (nccl on CUDA,
              gloo on CPU, the GPU of LOCAL_RANK), its predictions compared with the exact path's.
Agreement: top-1 equal, top-5 equal (as ordered lists), max |difference| of the top-1 probability and of the
largest logit, exact and AMP against the CPU on the common images, and AMP against exact on all of them.
A JSON summary goes to --out.

On a GPU machine (python3 with torch and CUDA; effconv installed without its dependencies, as they are there
except simplejpeg: without it the images are written as PNG, decoded by PIL):

    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . && \\
      PYTHONPATH=/tmp/site python3 scripts/gpu_eval_check.py --out $OUT/gpu_eval_check.json

(to decode JPEG as the official pipeline does there, carry simplejpeg's wheel and install it with effconv).
Smoke test on this CPU machine (slow, tiny):

    .venv/bin/python scripts/gpu_eval_check.py --device cpu --arch b0 --image-size 64 --images 24 --cpu-images 8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effconv.models import create_model, load
from effconv.models.spec import get_arch
from effconv.output.artifact import write_artifact
from effconv.variants import preprocessing
from effconv.zoo import pipelines
from effconv.zoo.evaluation import AMP_DTYPES, evaluate
from effconv.zoo.inference import prepare

CLASSES = 10
CALIBRATION_BATCH = 8
RESIDUAL_GAMMA = 0.25
LOGITS_STD = 2.0


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-eval-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"device {device} ({_device_name(device)}), torch {torch.__version__}, work folder {work}")
    data = _images(work / "images", args.images, "jpg" if importlib.util.find_spec("simplejpeg") else "png")
    summary = {"device": _device_name(device), "torch": torch.__version__, "images": args.images, "archs": {}}
    for arch in args.arch:
        size = args.image_size or get_arch(arch).resolution
        batch = args.batch_size or (16 if arch == "l2" else 32)
        print(f"\n== {arch} at {size} px, batch {batch}, {args.workers} workers")
        weights, origin = _weights(arch, size, work / arch, device, args.weights_from, data)
        print(f"weights: {origin}")
        figures = _check(weights, data, work / arch, device, size, batch, args)
        summary["archs"][arch] = {"image_size": size, "batch_size": batch, "weights": origin, **figures}
    summary["v2_s_resize_on_device_bits"] = _v2_resize_bits(data, device)  # the TF2 bilinear pipeline too
    print(f"v2-s card, resize on the device vs the CPU path: {json.dumps(summary['v2_s_resize_on_device_bits'])}")
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    broken = [arch for arch, f in summary["archs"].items() if _differs(f["resize_on_device_bits"])]
    broken += ["v2-s"] if _differs(summary["v2_s_resize_on_device_bits"]) else []
    broken += [a for a, f in summary["archs"].items() if f["agreement"]["resize_on_device_vs_exact"]["max_dprob1"]]
    if broken:
        sys.exit(f"FAIL: --resize-on-device is not the CPU path's bits for {', '.join(sorted(set(broken)))}")


def _differs(bits: dict) -> bool:
    return bits["bit_identical"] != bits["images"]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["b7", "l2"], help="archs to check (default b7 l2)")
    parser.add_argument("--image-size", type=int, help="input size (default: each arch's native size)")
    parser.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    parser.add_argument("--cpu-images", type=int, default=24, help="images also run on the CPU (default 24)")
    parser.add_argument("--device", default="cuda", help="device of the exact and AMP runs (default cuda)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="bf16", help="AMP dtype (default bf16)")
    parser.add_argument("--batch-size", type=int, help="default 32 (l2: 16)")
    parser.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    parser.add_argument(
        "--weights-from",
        choices=("auto", "synth", "torch"),
        default="auto",
        help="auto: effconv synth where TensorFlow is installed, else calibrated in torch",
    )
    parser.add_argument("--no-torchrun", action="store_true", help="skip the torchrun (1 process) run")
    parser.add_argument("--work", help="folder for images, weights and predictions (default: a new temporary one)")
    parser.add_argument("--out", default="gpu_eval_check.json", help="JSON summary (default gpu_eval_check.json)")
    return parser.parse_args()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _images(folder: Path, count: int, suffix: str) -> Path:
    """Seeded photographs-like images (smooth colour fields, edges, noise) of 500x375 and 375x500, in class folders."""
    if folder.is_dir():
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = (375, 500) if i % 3 else (500, 375)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        pixels = rng.normal(0, 12, (height, width, 3))
        for _ in range(2):  # two coloured waves of random period and direction
            wave = np.sin(x / rng.uniform(20, 120) + y / rng.uniform(20, 120) + rng.uniform(0, 6))
            pixels += rng.random(3) * 127.5 * (0.5 + 0.5 * wave[..., None])
        pixels[: height // 3, : width // 4] = rng.random(3) * 255  # a flat block: an edge
        target = folder / str(i % CLASSES)
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(target / f"{i:04d}.{suffix}", **({"quality": 90} if suffix == "jpg" else {}))
    print(f"wrote {count} {suffix.upper()} images to {folder}")
    return folder


# --- weights ----------------------------------------------------------------------------------------------------


def _weights(arch: str, size: int, folder: Path, device: torch.device, source: str, data: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    has_tf = importlib.util.find_spec("tensorflow") is not None
    if source == "synth" or source == "auto" and has_tf:
        return _synthesised(arch, size, folder), "effconv synth + effconv convert"
    why = "asked for" if source == "torch" else "TensorFlow absent, no effconv synth"
    return _calibrated_in_torch(arch, size, folder, device, data), f"random, calibrated in torch ({why})"


def _synthesised(arch: str, size: int, folder: Path) -> Path:
    weights = folder / f"{arch}.pth"
    if not weights.exists():
        effconv = [sys.executable, "-m", "effconv"]
        subprocess.run([*effconv, "synth", "--arch", arch, "--out", folder / "ckpt", "--force"], check=True)
        convert = [
            "convert",
            "--src",
            folder / "ckpt",
            "--out",
            weights,
            "--image-size",
            str(size),
            "--variant",
            "standard",
            "-q",
        ]
        subprocess.run([*effconv, *map(str, convert)], check=True)
    return weights


def _calibrated_in_torch(arch: str, size: int, folder: Path, device: torch.device, data: Path) -> Path:
    """Random weights that behave like a trained network's, as `effconv synth` makes them, in torch.

    The batch-norm statistics are those of a batch of the generated images (synth takes N(0, 1) noise): the
    network then stays sane on exactly the images it is checked on.
    """
    weights = folder / f"{arch}.safetensors"
    if weights.exists():
        return weights
    settings = preprocessing("standard", size, arch)
    files = sorted(data.rglob("*.*"))[:CALIBRATION_BATCH]
    x = torch.from_numpy(np.stack([prepare(f, settings) for f in files])).to(device)
    torch.manual_seed(0)
    model = create_model(arch, 1000)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
        for block in model.blocks:
            if getattr(block, "has_residual", False):
                block.project_bn.weight.mul_(RESIDUAL_GAMMA)
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # the running statistics become this batch's
        model.to(device).train()
        model(x)
        model.eval()
        logits = model(x)
        model.classifier.weight.mul_(LOGITS_STD / logits.std())
        model.classifier.bias.zero_()
    for bn in batch_norms:
        bn.momentum = 0.1
    card = {
        "arch": arch,
        "family": "efficientnet",
        "variant": "standard",
        "num_classes": 1000,
        "image_size": size,
        "layout": "native",
        "dtype": "float32",
        "weights": "random, batch norm calibrated in torch (scripts/gpu_eval_check.py)",
        "preprocessing": settings,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_artifact(state, card, weights)
    return weights


# --- the runs -----------------------------------------------------------------------------------------------------


def _check(weights: Path, data: Path, folder: Path, device: torch.device, size: int, batch: int, args) -> dict:
    figures: dict = {}
    cpu_images = min(args.cpu_images, args.images)
    runs = {
        "cpu": dict(device="cpu", limit=cpu_images),
        "exact": dict(device=device),
        "amp": dict(device=device, amp=args.amp),
        "on_device": dict(device=device, resize_on_device=True),  # --resize-on-device: the resize on the GPU
    }
    for name, options in runs.items():
        predictions = folder / f"{name}.jsonl"
        predictions.unlink(missing_ok=True)
        model = load(weights)
        if name != "cpu":  # the first batch autotunes cuDNN: not part of the figure
            evaluate(model, data, batch_size=batch, workers=0, limit=batch, **options)
            _synchronize(device)
        workers = min(args.workers, 2) if name == "cpu" else args.workers
        result = evaluate(model, data, batch_size=batch, workers=workers, predictions=predictions, **options)
        peak = result.details.get("peak_gpu_memory_bytes")
        figures[name] = {
            "images": result.images,
            "images_per_second": round(result.images_per_second, 2),
            "seconds": round(result.seconds, 2),
            "peak_gpu_memory_gib": None if peak is None else round(peak / 2**30, 2),
            "exact": result.details["exact"],
        }
        memory = "" if peak is None else f", peak GPU memory {peak / 2**30:.2f} GiB"
        print(f"{name:>6}: {result.images} images, {result.images_per_second:.1f} images/s{memory}")
        del model
        _free(device)
    rows = {name: _rows(folder / f"{name}.jsonl") for name in runs}
    figures["agreement"] = {
        "exact_vs_cpu": _agreement(rows["exact"], rows["cpu"]),
        "amp_vs_cpu": _agreement(rows["amp"], rows["cpu"]),
        "amp_vs_exact": _agreement(rows["amp"], rows["exact"]),
        "resize_on_device_vs_exact": _agreement(rows["on_device"], rows["exact"]),
    }
    figures["resize_on_device_bits"] = _resize_bits(weights, data, device)
    print(f"resize on the device vs the CPU path: {json.dumps(figures['resize_on_device_bits'])}")
    for pair, agreement in figures["agreement"].items():
        print(f"{pair:>13}: {json.dumps(agreement)}")
    figures["model_only"] = _model_only(weights, device, size, batch, args.amp)
    print(f"model only: {json.dumps(figures['model_only'])}")
    if not args.no_torchrun:
        figures["torchrun"] = _torchrun(weights, data, folder, device, batch, rows["exact"])
        print(f"torchrun (1 process): {json.dumps(figures['torchrun'])}")
    return figures


def _v2_resize_bits(data: Path, device: torch.device) -> dict:
    """`_resize_bits` for an EfficientNetV2-S card (TF2 bilinear, no crop): the preprocessing alone, no weights."""
    return _settings_bits(preprocessing("standard", 384, "v2-s"), data, device)


def _resize_bits(weights: Path, data: Path, device: torch.device) -> dict:
    """The model's input from `pipelines.prepare` (CPU) and `prepare_on_device` (the crop resized on `device`)."""
    return _settings_bits(load(weights).card.preprocessing.to_json(), data, device)


def _settings_bits(settings: dict, data: Path, device: torch.device, count: int = 16) -> dict:
    files = sorted(p for p in data.rglob("*") if p.is_file())[:count]
    worst, equal = 0.0, 0
    for path in files:
        on_cpu = torch.from_numpy(pipelines.prepare(path, settings))
        on_device = pipelines.prepare_on_device(torch.from_numpy(pipelines.crop(path, settings)).to(device), settings)
        on_device = on_device.cpu()
        worst = max(worst, float((on_device.double() - on_cpu.double()).abs().max()))
        equal += bool(torch.equal(on_device.view(torch.int32), on_cpu.view(torch.int32)))
    return {"images": len(files), "bit_identical": equal, "max_abs_difference": worst}


def _rows(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines()[1:]
    return {row["path"]: row for row in map(json.loads, lines)}


def _agreement(rows: dict, reference: dict) -> dict:
    common = [path for path in reference if path in rows]
    top1 = sum(rows[p]["top5"][0] == reference[p]["top5"][0] for p in common)
    top5 = sum(rows[p]["top5"] == reference[p]["top5"] for p in common)
    prob = max(abs(rows[p]["prob5"][0] - reference[p]["prob5"][0]) for p in common)
    logit = max(abs(rows[p]["logit_max"] - reference[p]["logit_max"]) for p in common)
    return {"images": len(common), "top1_equal": top1, "top5_equal": top5, "max_dprob1": prob, "max_dlogit_max": logit}


def _model_only(weights: Path, device: torch.device, size: int, batch: int, amp: str) -> dict:
    model = load(weights).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    out = {}
    for name, dtype in (("exact", None), ("amp", AMP_DTYPES[amp])):
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast, _exact_flags(device, exact=dtype is None):
            model(x)
            _synchronize(device)
            calls, start = 0, time.perf_counter()
            while calls < 3 or time.perf_counter() - start < 2.0:
                model(x)
                calls += 1
            _synchronize(device)
        out[f"{name}_images_per_second"] = round(calls * batch / (time.perf_counter() - start), 1)
    del model
    _free(device)
    return out


@contextlib.contextmanager
def _exact_flags(device: torch.device, exact: bool):
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, not exact
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


def _torchrun(weights: Path, data: Path, folder: Path, device: torch.device, batch: int, exact: dict) -> dict:
    predictions, out = folder / "torchrun.jsonl", folder / "torchrun.json"
    predictions.unlink(missing_ok=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "effconv"]
    options = {"--weights": weights, "--data": data, "--device": device.type, "--limit": 2 * batch}
    options.update({"--batch-size": batch, "--workers": 2, "--predictions": predictions, "--out": out})
    command = [*launch, "eval", *(str(x) for item in options.items() for x in item), "--force", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    if done.returncode:
        return {"exit_code": done.returncode, "stderr": done.stderr.strip().splitlines()[-3:]}
    result = json.loads(out.read_text())
    return {"exit_code": 0, "device": result["device"], **_agreement(_rows(predictions), exact)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""CPU inference speed: effconv's EfficientNet vs timm's tf_ model of the same arch (same weights), and onnxruntime.

Needs a Python with effconv and timm (timm needs torchvision): `.venv-timm/bin/python`
(scripts/bootstrap.sh makes it) or any other; onnxruntime (+ onnxscript) adds the
ONNX column when installed.

For each arch, batch and input size (the native one and an odd one), in one process
and with the same thread count for all:
  timm            timm's model as created (NCHW, 'same' padding worked out on every call)
  ours            effconv's model as created (channels-last weights, padding worked out on every call)
  ours-static     ours after `set_input_size(S)` (padding worked out once)
  ours-nchw       ours with torch's default layout (`create_model(..., channels_last=False)`)
  timm-cl         timm's model in channels_last
  ours-static-cl  ours-static given a channels_last input (no layout change of the input)
  onnxruntime     `effconv export` of the same model at that size (skipped without onnxruntime)
  (--compile adds torch.compile of timm-cl and ours-static-cl.)
All of them are fed the same NCHW batch, except the -cl ones (the batch in channels_last).
Both models get the same random weights (BN statistics far from identity), loaded
into timm through effconv's timm layout names; every PyTorch variant must give
timm's logits within 1e-5 (max abs), onnxruntime within 1e-4, or the script fails.

Timing: warm-up, then rounds; in each round every variant runs for about
--chunk seconds, in a rotating order. Images/s is batch / the median time of one
call over all rounds; ratios are against timm in the same run. The load average
is printed: other work on the machine shows in these figures.

    .venv-timm/bin/python scripts/bench_inference.py                      # b0, b3, lite0, v2-s; batch 1 and 16
    .venv-timm/bin/python scripts/bench_inference.py --arch b0 --batch 1 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from effconv.mappings import engine
from effconv.mappings import timm as timm_layout
from effconv.models import create_model, spec

TORCH_ATOL = 1e-5
ONNX_ATOL = 1e-4


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=gen)
                t.copy_(r.abs() * 0.5 + 0.5 if name.endswith("running_var") else r * 0.1)


def build_models(arch: str):
    import timm

    ours = create_model(arch)
    randomise(ours, seed=0)
    theirs = timm.create_model(timm_layout.model_name(arch), pretrained=False).eval()
    names = engine.layout_names(timm_layout.TABLE, arch, ours.num_classes)
    theirs.load_state_dict(engine.rename(ours.state_dict(), names), strict=True)
    return ours, theirs


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def onnx_session(model, size: int, threads: int, workdir: Path):
    """An onnxruntime session of `effconv export`'s graph for `size`, or None without onnxruntime."""
    try:
        import onnxruntime as ort

        from effconv.output.export import export_model
    except ImportError:
        return None
    path = workdir / f"{model.arch}-{size}.onnx"
    export_model(copy.deepcopy(model), path, size, check=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def variants(ours, theirs, size: int, threads: int, workdir: Path, compile_: bool) -> dict:
    """name -> (callable, wants channels_last input)."""
    static = copy.deepcopy(ours).set_input_size(size)
    nchw = copy.deepcopy(ours).to(memory_format=torch.contiguous_format)
    out = {
        "timm": (theirs, False),
        "ours": (ours, False),
        "ours-static": (static, False),
        "ours-nchw": (nchw, False),
        "timm-cl": (channels_last(theirs), True),
        "ours-static-cl": (static, True),
    }
    session = onnx_session(nchw, size, threads, workdir)
    if session is not None:
        out["onnxruntime"] = (session, False)
    if compile_:
        out["timm-cl-compiled"] = (torch.compile(out["timm-cl"][0]), True)
        out["ours-static-cl-compiled"] = (torch.compile(copy.deepcopy(static)), True)
    return out


def time_calls(fn, x, seconds: float) -> list[float]:
    times = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def bench_case(models: dict, batch: int, size: int, rounds: int, chunk: float) -> dict:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    inputs = {name: x_cl if cl else x for name, (_, cl) in models.items()}
    diffs = {}
    with torch.inference_mode():
        reference = models["timm"][0](x)
        for name, (fn, _) in models.items():
            fn(inputs[name])  # warm-up (and compilation)
            diffs[name] = float((fn(inputs[name]) - reference).abs().max())
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name] += time_calls(models[name][0], inputs[name], chunk)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, d in diffs.items():
        limit = ONNX_ATOL if name == "onnxruntime" else TORCH_ATOL
        if not d <= limit:
            raise SystemExit(f"{name} differs from timm by {d:.3g} (max abs) at batch {batch}, size {size}")
    return {
        "batch": batch,
        "size": size,
        "images_per_s": {k: round(batch / v, 2) for k, v in med.items()},
        "vs_timm": {k: round(med["timm"] / v, 3) for k, v in med.items()},
        "max_abs_diff_vs_timm": diffs,
        "calls": {k: len(v) for k, v in times.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def print_case(arch: str, case: dict) -> None:
    print(
        f"\n{arch} batch {case['batch']} at {case['size']} px "
        f"(load average {case['load_average_1min']:.2f}; ratio = speed / timm's, same run)"
    )
    print(f"  {'variant':<18}{'images/s':>10}{'ratio':>8}{'max|diff| vs timm':>20}{'calls':>7}")
    for name, ips in case["images_per_s"].items():
        diff = case["max_abs_diff_vs_timm"][name]
        print(f"  {name:<18}{ips:>10.2f}{case['vs_timm'][name]:>8.2f}{diff:>20.2e}{case['calls'][name]:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=spec.ARCH_NAMES, help="repeatable; default b0, b3, lite0, v2-s")
    ap.add_argument("--batch", action="append", type=int, help="repeatable; default 1 and 16")
    ap.add_argument("--odd-size", type=int, help="the odd input size (default: native + 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads (default all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=float, default=0.5, help="seconds per variant per round")
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes of compiling)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import timm

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, "
        f"{args.threads} thread(s) of {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    report = {"torch": torch.__version__, "timm": timm.__version__, "threads": args.threads, "archs": {}}
    with tempfile.TemporaryDirectory(prefix="effconv-bench-") as tmp:
        for arch in args.arch or ["b0", "b3", "lite0", "v2-s"]:
            native = spec.get_arch(arch).resolution
            ours, theirs = build_models(arch)
            cases = []
            for size in (native, args.odd_size or native + 1):
                with contextlib.redirect_stdout(sys.stderr):
                    models = variants(ours, theirs, size, args.threads, Path(tmp), args.compile)
                for batch in args.batch or [1, 16]:
                    case = bench_case(models, batch, size, args.rounds, args.chunk)
                    print_case(arch, case)
                    cases.append(case)
            report["archs"][arch] = cases
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Runs in .venv-timm (torch 2.14.1, torchvision, timm, mmpretrain), never in the main venv.

Loads converted files into the REAL timm and mmpretrain models (strict) and runs them,
and lists the real models' state-dict keys and shapes. Imports nothing from effconv:
this is the libraries' side of the comparison; tests/integration/test_layouts.py judges it.

    .venv-timm/bin/python tests/support/library_side.py JOBS.json OUT_DIR

JOBS.json: {"input": "x.npz" (key "x", NCHW float32, already normalised),
            "load": [{"name", "library": "timm"|"mmpretrain", "arch", "num_classes", "head_channels", "weights"}],
            "keys": {"archs": [...], "libraries": [...], "head_channels": {arch: channels}}}
Writes OUT_DIR/logits.npz (one array per load job) and OUT_DIR/keys.json
({library: {arch: {key: shape}}}).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")  # mmcv-lite warns about the compiled ops it lacks


def build(library: str, arch: str, num_classes: int, head_channels: int, device: str = "cpu") -> torch.nn.Module:
    with torch.device(device):
        if library == "timm":
            import timm

            return timm.create_model(f"tf_efficientnet_{arch}", pretrained=False, num_classes=num_classes).eval()
        from mmpretrain.models import build_classifier

        head = (
            {"type": "LinearClsHead", "num_classes": num_classes, "in_channels": head_channels} if num_classes else None
        )
        cfg = {
            "type": "ImageClassifier",
            "backbone": {"type": "EfficientNet", "arch": arch},
            "neck": {"type": "GlobalAveragePooling"},
            "head": head,
        }
        return build_classifier(cfg).eval()


def load(model: torch.nn.Module, library: str, weights: str) -> None:
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights), strict=True)
    elif library == "mmpretrain":
        from mmengine.runner import load_checkpoint

        load_checkpoint(model, weights, map_location="cpu", strict=True)  # how mmpretrain users load
    else:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)


def forward(model: torch.nn.Module, library: str, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x) if library == "timm" else model(x, mode="tensor")
    if isinstance(out, tuple | list):  # mmpretrain without a head returns the neck's tuple
        out = out[-1]
    return out.float().numpy()


@contextlib.contextmanager
def no_random_init():
    """Parameters keep their uninitialised memory: building an l2 for its key list takes no seconds."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def main(jobs_path: str, out_dir: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    out = Path(out_dir)
    logits = {}
    if jobs.get("load"):
        with np.load(jobs["input"]) as data:
            x = torch.from_numpy(data["x"])
        for job in jobs["load"]:
            model = build(job["library"], job["arch"], job["num_classes"], job["head_channels"])
            load(model, job["library"], job["weights"])
            logits[job["name"]] = forward(model, job["library"], x)
            print(
                f"{job['name']}: loaded strict into {type(model).__name__}, output {tuple(logits[job['name']].shape)}"
            )
    np.savez(out / "logits.npz", **logits)
    keys: dict[str, dict[str, dict[str, list[int]]]] = {}
    spec = jobs.get("keys") or {}
    for library in spec.get("libraries", []):
        for arch in spec.get("archs", []):
            # timm builds on the meta device; mmpretrain's builder calls .item(), so it needs real
            # tensors: random initialisation (seconds for l2) is skipped, only names and shapes count.
            channels = spec["head_channels"][arch]
            with no_random_init():
                model = build(library, arch, 1000, channels, "meta" if library == "timm" else "cpu")
            keys.setdefault(library, {})[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
            del model
    (out / "keys.json").write_text(json.dumps(keys))
    import mmpretrain
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, mmpretrain {mmpretrain.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:])

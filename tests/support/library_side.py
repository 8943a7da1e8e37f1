"""Runs in .venv-timm (torch 2.14.1, torchvision, timm, mmpretrain), never in the main venv.

Loads converted files into the REAL timm, mmpretrain and transformers models (strict; transformers
through `from_pretrained(folder)`, offline) and runs them, and lists the real models' state-dict keys
and shapes. Imports nothing from effconv:
this is the libraries' side of the comparison; tests/integration/test_layouts.py judges it.

    .venv-timm/bin/python tests/support/library_side.py JOBS.json OUT_DIR

JOBS.json: {"input": "x.npz" (key "x", NCHW float32, already normalised),
            "load": [{"name", "library": "timm"|"mmpretrain"|"hf", "arch", "num_classes", "head_channels",
                      "weights" (hf: the folder), optional "input": an x.npz of its own,
                      optional "model": timm's model name or mmpretrain's ImageClassifier config (default:
                      built from "arch" as for the B family)}],
            "keys": {"archs": [...] or {library: [...]}, "libraries": [...], "head_channels": {arch: channels},
                     "hf_configs": {arch: config.json's object} (for "hf"),
                     optional "models": {library: {arch: "model" as in a load job}}}}
Writes OUT_DIR/logits.npz (one array per load job) and OUT_DIR/keys.json
({library: {arch: {key: shape}}}). "cards": [job of `run_card`] runs model cards' own create lines:
OUT_DIR/cards.json (the data config each yields), OUT_DIR/card_logits.npz, OUT_DIR/model_names.json.
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


def build(
    library: str, arch: str, num_classes: int, head_channels: int, device: str = "cpu", model=None
) -> torch.nn.Module:
    """A fresh model: timm's `model` (a name; default `tf_efficientnet_<arch>`) or mmpretrain's (an ImageClassifier
    config, its head sized for `num_classes`; default the B family's backbone of `arch`)."""
    with torch.device(device):
        if library == "timm":
            import timm

            name = model or f"tf_efficientnet_{arch}"
            return timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
        from mmpretrain.models import build_classifier

        head = (
            {"type": "LinearClsHead", "num_classes": num_classes, "in_channels": head_channels} if num_classes else None
        )
        cfg = {
            "type": "ImageClassifier",
            "backbone": {"type": "EfficientNet", "arch": arch},
            "neck": {"type": "GlobalAveragePooling"},
            **(model or {}),
            "head": head,
        }
        return build_classifier(cfg).eval()


def build_hf(config: dict, device: str = "cpu") -> torch.nn.Module:
    """A fresh `EfficientNetForImageClassification` of `config` (config.json's object)."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    with torch.device(device):
        return EfficientNetForImageClassification(EfficientNetConfig.from_dict(config)).eval()


def load_hf(folder: str) -> torch.nn.Module:
    """How a transformers user loads the folder; any missing, unexpected or mismatched key fails."""
    from transformers import EfficientNetForImageClassification

    model, info = EfficientNetForImageClassification.from_pretrained(folder, output_loading_info=True)
    problems = {k: sorted(v)[:5] if isinstance(v, set | list) else v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"{folder}: from_pretrained reported {problems}")
    return model.eval()


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
        if library == "hf":
            return model(x).logits.float().numpy()
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


def run_card(job: dict) -> tuple[dict, np.ndarray | None]:
    """Run a model card's own `create` statements as a user would; the data config the library then resolves.

    job: {"name", "library", "statements" (Python that sets `model`, with `weights` the file's path),
    "weights" (None: no file; the statements then build on the meta device, only the config counts),
    "input" (an .npz with "x", NCHW, to run the model on; optional)}.
    """
    import mmengine
    import safetensors.torch
    import timm
    import timm.data
    from mmpretrain import get_model

    scope = {"timm": timm, "get_model": get_model, "mmengine": mmengine, "safetensors": safetensors}
    scope["weights"] = job["weights"]
    with torch.device("cpu" if job["weights"] else "meta"):
        exec(job["statements"], scope)  # the card's line, as the user pastes it
    model = scope["model"].eval()
    if job["library"] == "timm":
        config = timm.data.resolve_model_data_config(model)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    else:
        pre = model.data_preprocessor
        config = {"mean": pre.mean.flatten().tolist(), "std": pre.std.flatten().tolist()}
    logits = None
    if job.get("input"):
        with np.load(job["input"]) as data:
            logits = forward(model, job["library"], torch.from_numpy(data["x"]))
    return config, logits


def run_cards(jobs: list[dict], out: Path) -> None:
    """Every card job: OUT_DIR/cards.json ({name: data config}), OUT_DIR/card_logits.npz, and
    OUT_DIR/model_names.json: the pretrained names each library has, for effconv's tables of them (and
    mmpretrain's EfficientNet config names, under "mmpretrain_configs")."""
    configs, logits = {}, {}
    for job in jobs:
        configs[job["name"]], got = run_card(job)
        if got is not None:
            logits[job["name"]] = got
        print(f"card {job['name']}: {configs[job['name']]}")
    (out / "cards.json").write_text(json.dumps(configs))
    np.savez(out / "card_logits.npz", **logits)
    import mmpretrain
    import timm

    configs = Path(mmpretrain.__file__).parent / ".mim" / "configs"  # the config files get_model and users name
    names = {
        "timm": timm.list_pretrained("tf_efficientnet_*") + timm.list_pretrained("tf_efficientnetv2_*"),
        "mmpretrain": mmpretrain.list_models("efficientnet*"),
        "mmpretrain_configs": sorted(p.stem for p in configs.glob("efficientnet*/*.py")),
    }
    (out / "model_names.json").write_text(json.dumps(names))


def main(jobs_path: str, out_dir: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    out = Path(out_dir)
    logits = {}
    if jobs.get("load"):
        with np.load(jobs["input"]) as data:
            x = torch.from_numpy(data["x"])
        for job in jobs["load"]:
            if job["library"] == "hf":
                model = load_hf(job["weights"])
            else:
                model = build(
                    job["library"], job["arch"], job["num_classes"], job["head_channels"], model=job.get("model")
                )
                load(model, job["library"], job["weights"])
            if "input" in job:
                with np.load(job["input"]) as data:
                    logits[job["name"]] = forward(model, job["library"], torch.from_numpy(data["x"]))
            else:
                logits[job["name"]] = forward(model, job["library"], x)
            print(
                f"{job['name']}: loaded strict into {type(model).__name__}, output {tuple(logits[job['name']].shape)}"
            )
    np.savez(out / "logits.npz", **logits)
    keys: dict[str, dict[str, dict[str, list[int]]]] = {}
    spec = jobs.get("keys") or {}
    for library in spec.get("libraries", []):
        archs = spec.get("archs", [])
        for arch in archs.get(library, []) if isinstance(archs, dict) else archs:
            # timm builds on the meta device; mmpretrain's builder calls .item(), so it needs real
            # tensors: random initialisation (seconds for l2) is skipped, only names and shapes count.
            channels = spec["head_channels"][arch]
            named = spec.get("models", {}).get(library, {}).get(arch)
            with no_random_init():
                if library == "hf":
                    model = build_hf(spec["hf_configs"][arch], "meta")
                else:
                    model = build(library, arch, 1000, channels, "meta" if library == "timm" else "cpu", named)
            keys.setdefault(library, {})[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
            del model
    (out / "keys.json").write_text(json.dumps(keys))
    run_cards(jobs.get("cards") or [], out)
    import mmpretrain
    import timm

    versions = f"torch {torch.__version__}, timm {timm.__version__}, mmpretrain {mmpretrain.__version__}"
    if "transformers" in sys.modules:
        versions += f", transformers {sys.modules['transformers'].__version__}"
    print(versions)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The `effconv` command: a thin layer over the library that parses, prints and maps errors to exit codes.

Exit codes: 0 success, 1 parity failure (verify), 2 bad input or usage, or an output that could not be
written (a full disk), 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
from collections import Counter

import click
from click.core import ParameterSource

from effconv import __version__
from effconv.ema_policy import POLICIES
from effconv.errors import EffconvError, UsageError, one_line
from effconv.mappings.layouts import LAYOUT_NAMES
from effconv.models.spec import ARCH_NAMES, OFFICIAL_NAMES
from effconv.output.dtypes import WEIGHT_DTYPES
from effconv.variants import VARIANTS

VARIANT_NAMES = tuple(VARIANTS)
EMA_HELP = "auto: the EMA copies when the checkpoint has them (as the official evaluator), raw otherwise"
SRC_HELP = "checkpoint directory, prefix (.../model.ckpt), .index file, or the .tar/.tar.gz as downloaded"
KERAS_SRC_HELP = (
    "; or a Keras applications EfficientNet: legacy .h5, Keras 3 .keras or .weights.h5, or a SavedModel folder"
)


# Every arch by its short name (b5) or its official one (efficientnet-b5); the command sees the short one.
ARCH_TYPE = click.Choice([*ARCH_NAMES, *OFFICIAL_NAMES], case_sensitive=False)
ARCH_HELP = f"{', '.join(ARCH_NAMES)} (or the official name, e.g. {next(iter(OFFICIAL_NAMES))})"


def _short_arch(_ctx, _param, value: str | None) -> str | None:
    if value is None:
        return None
    return next((short for name, short in OFFICIAL_NAMES.items() if name.lower() == value.lower()), value.lower())


def _fail(message: str, code: int) -> None:
    # One line whatever the message holds (torch's load_state_dict lists each mismatch on a line).
    click.echo(f"effconv: error: {one_line(message)}", err=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: every `finally` and `with` runs."""


def _raise_terminated(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM unwinds the stack (temporaries removed) instead of killing on the spot."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding program's worker): leave signals to it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handles_errors(command):
    """Turn our exceptions into one line on stderr and the documented exit code (SIGINT 130, SIGTERM 143)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_unwinds():
                return command(*args, **kwargs)
        except EffconvError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Terminated:
            _fail("terminated (SIGTERM); nothing was written", 128 + signal.SIGTERM)

    return wrapper


def _renamed(new: str, value: str, old: str, old_value: str | None) -> str:
    """The value of option `new`, once called `old`: the old name still works, with a warning on stderr."""
    if old_value is None:
        return value
    ctx = click.get_current_context()
    given = ctx.get_parameter_source(new.lstrip("-").replace("-", "_")) is not ParameterSource.DEFAULT
    if given and value != old_value:
        raise UsageError(f"{new} {value} contradicts {old} {old_value}, its deprecated name: give {new} only")
    click.secho(f"effconv: warning: {ctx.info_name} {old} is deprecated: use {new} {old_value}", err=True, fg="yellow")
    return old_value


@contextlib.contextmanager
def _heavy_imports():
    """Import torch (or TensorFlow) without the cycle collector's cost.

    Importing torch creates about a million long-lived objects: the collector scans them
    again and again during the import and once more at interpreter exit, ~0.3 s of a ~2 s
    conversion. It is paused for the import, and what was imported is then frozen
    (`gc.freeze`: left out of every later collection); new objects are collected as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


class _StatusLine:
    """A one-line status of what is running, with its elapsed time (TF, PyTorch and torch's ONNX exporter
    take seconds to minutes): on a terminal the line is redrawn every half second, so that a long step
    shows it is alive; elsewhere each step is one line.
    """

    TICK_SECONDS = 0.5

    def __init__(self, quiet: bool):
        import threading

        self.quiet = quiet
        self.start = None
        self.message = ""
        self.active = sys.stderr.isatty() and not quiet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if self.active else None

    def __call__(self, message: str) -> None:
        import time

        self.start = self.start or time.perf_counter()
        self.message = message
        if self.active:
            self._draw()
            if not self._ticker.is_alive() and not self._stop.is_set():
                self._ticker.start()
        elif not self.quiet:
            click.echo(self._text(), err=True)

    def _text(self) -> str:
        import time

        return f"[{time.perf_counter() - self.start:6.1f}s] {self.message}"

    def _draw(self) -> None:
        with self._lock:
            if not self._stop.is_set():
                click.echo(f"\r\033[K{self._text()}", nl=False, err=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK_SECONDS):
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        if self._ticker is not None and self._ticker.is_alive():
            self._ticker.join()
        if self.active:
            click.echo("\r\033[K", nl=False, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="effconv")
def main() -> None:
    """Convert official TensorFlow EfficientNet checkpoints (b0-b8, l2) to exact PyTorch models."""


@main.command()
@click.option("--src", required=True, help=SRC_HELP + KERAS_SRC_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="output weights X.pth or X.safetensors; X.json is the card (--layout hf: a folder DIR)",
)
@click.option(
    "--arch",
    type=ARCH_TYPE,
    callback=_short_arch,
    metavar="ARCH",
    help=f"expected arch, detected when omitted (error if it differs): {ARCH_HELP}",
)
@click.option("--ema", type=click.Choice(POLICIES), default="auto", show_default=True, help=EMA_HELP)
@click.option("--weights", "old_ema", type=click.Choice(POLICIES), hidden=True, help="deprecated name of --ema")
@click.option("--allow-mixed", is_flag=True, help="accept a checkpoint with EMA copies for only some variables")
@click.option(
    "--variant",
    type=click.Choice(VARIANT_NAMES),
    help="training variant; decides the preprocessing in the card (advprop: [-1, 1] input). "
    "Detected from official file names when possible, else 'standard'",
)
@click.option("--image-size", type=click.IntRange(16, 4096), help="input size recorded in the card (default native)")
@click.option(
    "--layout",
    type=click.Choice(LAYOUT_NAMES),
    default="native",
    show_default=True,
    help="state-dict names: effconv's own model, timm's tf_efficientnet_*, mmpretrain's EfficientNet, "
    "or a transformers EfficientNetForImageClassification folder (hf)",
)
@click.option(
    "--dtype",
    type=click.Choice(WEIGHT_DTYPES),
    default="float32",
    show_default=True,
    help="weights dtype (batch-norm running statistics stay float32)",
)
@click.option("--force", is_flag=True, help="overwrite existing output files")
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="keep weights holding NaN or Inf (refused by default); the card lists them under 'nonfinite'",
)
@click.option("-q", "--quiet", is_flag=True, help="no progress bar or summary")
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    help="where `effconv download` put catalogue checkpoints, for --src NAME (default: the cache)",
)
@handles_errors
def convert(
    src, out, arch, ema, old_ema, allow_mixed, variant, image_size, force, allow_nonfinite, quiet, dest, layout, dtype
):
    """Convert a checkpoint to a PyTorch state dict (X.pth) plus model card (X.json).

    --src also takes a catalogue name (`effconv list`) once `effconv download NAME` has fetched it.
    """
    from effconv import formats
    from effconv.output import hashing
    from effconv.zoo.download import resolve_source

    ema = _renamed("--ema", ema, "--weights", old_ema)  # --weights names a converted file elsewhere
    src, variant, image_size = resolve_source(src, variant, image_size, dest)
    hashing.prefetch(formats.local_files(src))  # the sha256s for the card, while torch imports
    with _heavy_imports():
        from effconv.convert import convert_checkpoint
        from effconv.output.folder import writer_for

    with writer_for(out, force, layout) as artifact:  # checks the output before any work
        bar, update = _progress_bar("converting") if not quiet else (None, None)
        try:
            result = convert_checkpoint(
                src,
                arch=arch,
                ema=ema,
                allow_mixed=allow_mixed,
                variant=variant,
                image_size=image_size,
                layout=layout,
                dtype=dtype,
                progress=update,
                sink=artifact.add,  # each tensor is written as soon as it is converted
                allow_nonfinite=allow_nonfinite,
            )
        finally:
            if bar is not None:
                bar.close()
        for warning in result.warnings:
            click.secho(f"effconv: warning: {warning}", err=True, fg="yellow")
        weights_path, card_path = artifact.commit(result.card, result.order)
    if not quiet:
        from effconv.card import ModelCard

        card = ModelCard.from_json(result.card, where="the conversion's model card")
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(result.skipped.values()).most_common())
        click.echo(
            f"converted efficientnet-{card.arch} ({card.num_classes} classes, variant {card.variant}, "
            f"{card.weights.upper()} weights)\n"
            f"  {card.mapped} tensors mapped, {len(result.skipped)} skipped ({reasons or 'none'})\n"
            f"  {card.parameters:,} parameters in {result.seconds:.2f} s "
            f"({card.layout} layout, {card.dtype})\n"
            f"  wrote {weights_path} and {card_path}"
        )


@main.command()
@click.option("--src", required=True, help=SRC_HELP + KERAS_SRC_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@handles_errors
def inspect(src, as_json):
    """Show what a checkpoint holds: arch, classes, EMA, variables, bytes."""
    from effconv.inspection import format_report, inspect_checkpoint

    report = inspect_checkpoint(src)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.option("--arch", required=True, type=ARCH_TYPE, callback=_short_arch, metavar="ARCH", help=ARCH_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory to create")
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(0), help="0: no head")
@click.option("--ema-only", is_flag=True, help="only EMA copies, like the released L2 checkpoints")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="write into an existing, non-empty directory")
@click.option("--verbose", is_flag=True, help="keep TensorFlow's start-up log lines (absl, oneDNN, CPU features)")
@handles_errors
def synth(arch, out, num_classes, ema_only, seed, force, verbose):
    """Write a random, well-scaled checkpoint in the official format (needs TensorFlow)."""
    from pathlib import Path

    from effconv.parity.quiet_tensorflow import import_tensorflow

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not force:
        raise UsageError(f"output directory is not empty: {target} (use --force)")
    try:
        import_tensorflow(verbose)
        from effconv.parity.synth import write_synthetic_checkpoint
    except ImportError as e:
        raise UsageError(f"effconv synth needs TensorFlow ({e}); pip install 'effconv[tf]'") from e
    prefix = write_synthetic_checkpoint(
        arch, target, num_classes=num_classes, ema_only=ema_only, seed=seed, progress=lambda m: click.echo(m, err=True)
    )
    click.echo(f"wrote official-format efficientnet-{arch} checkpoint {prefix}")


@main.command()
@click.option("--src", required=True, help=SRC_HELP)
@click.option(
    "--weights", "artifact", type=click.Path(dir_okay=False), help="converted X.pth to check (card beside it)"
)
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1), help="random inputs per batch")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the N(0,1) inputs")
@click.option(
    "--input-size",
    "input_sizes",
    multiple=True,
    type=click.IntRange(1),
    help="input side in pixels; repeatable; default the native size (any size, odd ones included)",
)
@click.option("--images", type=click.Path(file_okay=False), help="folder of real images (.jpg/.png) to compare on")
@click.option("--inputs", type=click.Path(dir_okay=False), help="your own NHWC float batch (.npy, or .npz with 'x')")
@click.option("--atol", type=float, help="absolute tolerance on logits (default: by the weights' dtype; float32: 1e-3)")
@click.option(
    "--rtol", type=float, help="tolerance relative to max |TF logit| (default: by the weights' dtype; float32: 0)"
)
@click.option("--per-layer", is_flag=True, help="compare every endpoint (automatic when logits fail)")
@click.option(
    "--ema",
    type=click.Choice(POLICIES),
    default="auto",
    show_default=True,
    help="EMA choice for an in-memory conversion (ignored with --weights: the card decides)",
)
@click.option("--weights-policy", "old_ema", type=click.Choice(POLICIES), hidden=True, help="deprecated: --ema")
@click.option("--allow-mixed", is_flag=True, help="accept partial EMA coverage (in-memory conversion)")
@click.option("--variant", type=click.Choice(VARIANT_NAMES), help="preprocessing for --images (in-memory conversion)")
@click.option(
    "--report",
    "reports",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="write a report: .json, .md, .xml (JUnit) or .png (per-layer plot); repeatable",
)
@click.option("-q", "--quiet", is_flag=True, help="print only the verdict (on stdout)")
@click.option("--verbose", is_flag=True, help="keep TensorFlow's start-up log lines (absl, oneDNN, CPU features)")
@handles_errors
def verify(
    src,
    artifact,
    batch,
    seed,
    input_sizes,
    images,
    inputs,
    atol,
    rtol,
    per_layer,
    ema,
    old_ema,
    allow_mixed,
    variant,
    reports,
    quiet,
    verbose,
):
    """Run TensorFlow and PyTorch on identical inputs and compare logits (and layers).

    Every argument is checked before TensorFlow starts. The verdict (PASS or FAIL) is the last line on stdout.
    Exit code 0: parity within tolerance; 1: parity failure; 2: usage or input error.
    """
    from effconv.parity import arguments
    from effconv.parity.reports import check_report_paths, to_markdown, write_reports

    ema = _renamed("--ema", ema, "--weights-policy", old_ema)
    kept = () if artifact is None else (artifact, os.path.splitext(artifact)[0] + ".json")
    report_paths = check_report_paths(reports, keep=kept)
    if images is not None:
        arguments.image_files(images)
    if artifact is not None:
        arguments.check_weights_fit_source(src, artifact)
    from effconv.parity.quiet_tensorflow import import_tensorflow
    from effconv.parity.verify import load_inputs
    from effconv.parity.verify import verify as run_verify

    batch_given = load_inputs(inputs) if inputs else None
    try:
        import_tensorflow(verbose)
    except ImportError as e:
        raise UsageError(f"effconv verify needs TensorFlow ({e}); pip install 'effconv[tf]'") from e
    status = _StatusLine(quiet)
    try:
        result = run_verify(
            src,
            artifact,
            batch=batch,
            seed=seed,
            input_sizes=list(input_sizes) or None,
            images=images,
            inputs=batch_given,
            atol=atol,
            rtol=rtol,
            per_layer=per_layer,
            ema=ema,
            allow_mixed=allow_mixed,
            variant=variant,
            say=status,
        )
    finally:
        status.close()
    data = result.to_dict()
    write_reports([data], report_paths)
    if not quiet:
        click.echo(to_markdown([data], f"efficientnet-{result.arch} parity ({result.weights.upper()} weights)"))
        for case in result.cases:
            if case.layers:
                click.echo(f"per-layer max |torch - tf| for {case.name}:")
                for layer in case.layers:
                    mark = "ok " if layer.passed else "BAD"
                    click.echo(f"  {mark} {layer.name:<16} {layer.max_abs:.3g} (tol {layer.tolerance:.3g})")
    if result.passed:
        click.echo(f"PASS: efficientnet-{result.arch}, {len(result.cases)} case(s) within tolerance")
    else:
        bad = [c for c in result.cases if not c.passed]
        where = ", ".join(f"{c.name} first diverges at {c.first_divergent}" for c in bad)
        click.echo(f"FAIL: {where}")
        sys.exit(1)


# --- the model zoo: catalogue, download, predict, eval --------------------------------


@main.command("list")
@click.option("--arch", type=click.Choice(ARCH_NAMES), help="only this architecture")
@click.option("--variant", type=click.Choice(VARIANT_NAMES), help="only this training variant")
@click.option("--json", "as_json", is_flag=True, help="every field, machine-readable")
@handles_errors
def list_models(arch, variant, as_json):
    """The official checkpoints effconv knows: names, sizes and published ImageNet accuracy."""
    from effconv.zoo import catalogue

    rows = catalogue.select(arch, variant)
    if not rows:  # a bare header, or [], would not say why
        click.echo(catalogue.explain_no_match(arch, variant), err=as_json)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in rows], indent=2))
    elif rows:
        click.echo(catalogue.format_table(rows))
        if note := catalogue.checksum_note(rows):
            click.echo(note, err=True)  # a note to read, not a row: the table on stdout stays a table


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--dest", type=click.Path(file_okay=False), help="download folder (default: the cache, $EFFCONV_CACHE/checkpoints)"
)
@click.option("--base-url", help="fetch from this mirror instead of the official bucket (or set $EFFCONV_BASE_URL)")
@click.option("--extract/--no-extract", default=True, show_default=True, help="also extract the checkpoint")
@click.option("--force", is_flag=True, help="download again even if present (e.g. after a checksum mismatch)")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0), help="resumed retries per file")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@handles_errors
def download(names, dest, base_url, extract, force, retries, quiet):
    """Download catalogue checkpoints (resumable, sha256-checked) and extract them safely."""
    from effconv.zoo import catalogue
    from effconv.zoo.download import download as fetch

    entries = [catalogue.get_entry(name) for name in names]  # every name checked before any transfer
    for entry in entries:
        bar, update = _progress_bar(entry.name) if not quiet else (None, None)
        try:
            got = fetch(entry, dest, base_url=base_url, extract=extract, force=force, progress=update, retries=retries)
        finally:
            if bar is not None:
                bar.close()
        what = "downloaded" if got.fetched else "already present, checksum ok:"
        click.echo(f"{entry.name}: {what} {got.archive} (sha256 {got.sha256[:16]}...)")
        if got.checkpoint_dir is not None:
            click.echo(f"  checkpoint in {got.checkpoint_dir}")


@main.command()
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="converted X.pth (card beside it)")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="classes to show per image")
@click.option("--device", help="torch device: cpu, cuda, cuda:1, mps (default: cuda when available)")
@click.option(
    "--class-names",
    "class_names_file",
    type=click.Path(dir_okay=False),
    help="file of class names, one per line in label order (default: ImageNet's for 1000/1001 classes)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@handles_errors
def predict(weights, images, top_k, device, class_names_file, as_json):
    """Classify images (files, or folders of them), preprocessed exactly as the model card says.

    An image that cannot be read is named on stderr and the others are still classified (with --json it has
    an "error" in place of "top_k"). Exit code 0: every image classified; 2: any could not be read, or bad
    usage.
    """
    from effconv.output.loading import load
    from effconv.zoo.devices import resolve_device
    from effconv.zoo.inference import image_paths, read_class_names
    from effconv.zoo.inference import predict as run_predict

    device = resolve_device(device)  # before the model is read
    paths = image_paths(images)
    model = load(weights).to(device)
    names = read_class_names(class_names_file, model.num_classes) if class_names_file else None
    results = run_predict(model, paths, top_k=top_k, names=names, keep_going=True)
    failed = [r for r in results if "error" in r]
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            if "top_k" in result:
                click.echo(result["image"])
            for rank, guess in enumerate(result.get("top_k", ()), 1):
                click.echo(f"  {rank}. {guess['score']:7.2%}  {guess['class']} ({guess['label']})")
    for result in failed:
        click.echo(f"effconv: error: {one_line(result['error'])}", err=True)
    if failed:
        sys.exit(2)


@main.command("eval")
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="converted X.pth (card beside it)")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="class sub-folders, or flat + --labels")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="labels of a flat folder")
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(1), help="images per batch and process"
)
@click.option(
    "--workers", type=click.IntRange(0), help="DataLoader workers per process (default: min(4, cores per process))"
)
@click.option("--limit", type=click.IntRange(1), help="evaluate only the first N images")
@click.option(
    "--device",
    help="torch device: cpu, cuda (several processes: each its LOCAL_RANK's GPU), cuda:1, mps "
    "(default: cuda when available)",
)
@click.option(
    "--class-map",
    "class_map_file",
    type=click.Path(dir_okay=False),
    help="labels of the class folders: lines FOLDER [LABEL] (without LABEL: the line number, from 0)",
)
@click.option("--skip-bad", is_flag=True, help="leave unreadable images out (counted and listed in the result)")
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    help="per-image results, FILE.jsonl or FILE.csv, written as the run goes; started again with the same "
    "arguments, a run skips the images already in it",
)
@click.option(
    "--nproc",
    type=click.IntRange(1),
    help="evaluate in N processes on this machine (torchrun's launcher; with --device cuda, one GPU each)",
)
@click.option(
    "--amp",
    type=click.Choice(["bf16", "fp16"]),
    help="autocast to bfloat16/float16: faster on GPUs, not the exact path (the result says so)",
)
@click.option(
    "--resize-on-device",
    is_flag=True,
    help="decode and crop on the CPU workers, resize and normalise on --device (a GPU): the same bits, less CPU "
    "work per image",
)
@click.option(
    "--against-tf",
    is_flag=True,
    help="also run every image through TensorFlow (its own preprocessing ops, effconv's TF reference model from "
    "the source checkpoint) and report the agreement; one process, needs TensorFlow",
)
@click.option(
    "--src",
    metavar="CHECKPOINT",
    help="with --against-tf: the checkpoint the weights were converted from (default: the path their card records)",
)
@click.option("--out", type=click.Path(dir_okay=False), help="JSON result (default: <weights stem>-eval.json here)")
@click.option("--force", is_flag=True, help="overwrite an existing result file")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@handles_errors
def eval_command(
    weights,
    data,
    labels_file,
    batch_size,
    workers,
    limit,
    device,
    class_map_file,
    skip_bad,
    predictions,
    nproc,
    amp,
    resize_on_device,
    against_tf,
    src,
    out,
    force,
    quiet,
):
    """Top-1/top-5 accuracy with the official preprocessing; writes a JSON result.

    Class folders named by WordNet ids are ImageNet classes for a 1000/1001-class model; for any other head the
    sorted folder names are the labels 0, 1, ... (or --class-map). An unreadable image stops the run with an
    error naming it (exit 2) unless --skip-bad.

    Several processes: --nproc N on this machine, or torchrun (`torchrun --nproc-per-node N -m effconv eval
    ...`; across machines with torchrun's --nnodes and --rdzv-endpoint). The sorted images are shared out by
    rank; rank 0 gathers the results and alone writes the result and --predictions.

    --against-tf (one process): the same images also through TensorFlow's preprocessing ops and effconv's TF
    reference model built from the source checkpoint (--src, or the path the card records), with the copies
    (EMA or raw) the card records. The result adds the top-1 agreement, the largest and 99.9th-percentile
    |logit difference| and the images whose top-1 differ. Exit code 1 when an image's logits differ beyond
    verify's tolerance.
    """
    from pathlib import Path

    from effconv.zoo import distributed

    launched = distributed.launched_ranks()
    if nproc is not None and launched is not None:
        raise UsageError("--nproc starts its own processes: under torchrun leave it out (--nproc-per-node says it)")
    if against_tf:
        src = _against_tf_source(weights, src, nproc, launched, amp)
    elif src is not None:
        raise UsageError("--src names the checkpoint --against-tf reads; without --against-tf leave it out")
    out = Path(out or f"{Path(weights).stem}-eval.json")
    if launched is None or launched.is_main:  # only rank 0 writes
        if not out.parent.is_dir():
            raise UsageError(f"output directory does not exist: {out.parent}")
        if out.exists() and not force:
            raise UsageError(f"output exists: {out} (use --force to overwrite, or --out)")
    from effconv.zoo.devices import resolve_device

    resolved = resolve_device(device)  # before the model is read
    if nproc is not None and nproc > 1:
        _check_devices_for(nproc, resolved)
        values = dict(labels=labels_file, workers=workers, limit=limit, device=device, predictions=predictions)
        values.update({"class-map": class_map_file, "amp": amp, "out": out})
        flags = {"--skip-bad": skip_bad, "--force": force, "-q": quiet, "--resize-on-device": resize_on_device}
        options = [x for name, value in values.items() if value is not None for x in (f"--{name}", str(value))]
        argv = ["eval", "--weights", weights, "--data", data, "--batch-size", str(batch_size), *options]
        code = distributed.launch_here(nproc, [*argv, *(flag for flag, on in flags.items() if on)])
        if code:
            sys.exit(code)
        return
    with distributed.process_group(resolved) as (resolved, ranks):
        try:
            _evaluate_and_write(
                weights,
                data,
                out,
                ranks,
                quiet,
                labels_file=labels_file,
                batch_size=batch_size,
                workers=workers,
                limit=limit,
                device=resolved,
                skip_bad=skip_bad,
                class_map_file=class_map_file,
                predictions=predictions,
                amp=amp,
                resize_on_device=resize_on_device,
                against_tf_src=src if against_tf else None,
            )
        except EffconvError as e:
            if not ranks.distributed:
                raise
            if getattr(e, "on_every_rank", False):  # every process stops alike: rank 0 says why, once
                if ranks.is_main:
                    click.echo(f"effconv: error: {one_line(str(e))}", err=True)
                    # the launcher stops the others' remains with SIGTERM: no second line for that
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                with contextlib.suppress(EffconvError):
                    distributed.barrier()  # no process leaves (and gets the others stopped) before that line
                sys.exit(e.exit_code)
            if isinstance(e, distributed.DistributedError):
                raise
            raise type(e)(f"rank {ranks.rank}: {e}") from e


def _check_devices_for(nproc: int, device) -> None:
    """--nproc N: gloo on CPU, one GPU per process on CUDA."""
    import torch

    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"--nproc {nproc} with --device {device}: give --device cuda (one GPU per process)")
        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc} with --device cuda: this machine has {torch.cuda.device_count()} GPUs")
    elif device.type != "cpu":
        raise UsageError(f"--nproc with --device {device}: several processes run on cpu (gloo) or cuda (nccl)")


def _against_tf_source(weights, src, nproc, launched, amp) -> str:
    """--against-tf's checkpoint, every argument of it checked before TensorFlow and the model are loaded."""
    from effconv.zoo.against_tf import check_runnable, source_for

    check_runnable(nproc or (launched.world_size if launched is not None else 1), amp)
    src = source_for(weights, src)
    from effconv.parity.quiet_tensorflow import import_tensorflow

    try:
        import_tensorflow()
    except ImportError as e:
        raise UsageError(f"effconv eval --against-tf needs TensorFlow ({e}); pip install 'effconv[tf]'") from e
    return src


def _evaluate_and_write(
    weights, data, out, ranks, quiet, *, workers, class_map_file, against_tf_src=None, **options
) -> None:
    from tqdm import tqdm

    from effconv.output.loading import load
    from effconv.zoo.evaluation import evaluate, read_class_map
    from effconv.zoo.predictions import write_replacing

    class_map = read_class_map(class_map_file) if class_map_file else None
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    model = load(weights)
    against = None
    if against_tf_src is not None:
        from effconv.zoo.against_tf import AgainstTF, build_reference
        from effconv.zoo.inference import card_preprocessing

        status = _StatusLine(quiet)
        try:
            reference = build_reference(against_tf_src, model.card, say=status)
        finally:
            status.close()
        against = AgainstTF(reference, card_preprocessing(model), model.card.dtype)
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # from the images a resumed run found done: its rate and ETA count this run's only
            bar = tqdm(total=total, initial=done, unit="img", desc="eval", leave=False, disable=True if quiet else None)
        bar.update(done - bar.n)

    try:
        result = evaluate(
            model, data, workers=workers, progress=update, class_map=class_map, against_tf=against, **options
        )
    finally:
        if bar is not None:
            bar.close()
    if not ranks.is_main:
        return
    write_replacing(out, [(json.dumps({"weights": weights, **result.to_dict()}, indent=2) + "\n").encode()])
    device = result.details["device"]
    where = f"{ranks.world_size} processes on {device.split(':')[0]}" if ranks.distributed else device
    speed = f"{result.images_per_second:.1f} images/s, {where}"
    if result.details["resumed"]:
        speed = f"{result.details['resumed']} from the predictions file, {result.details['evaluated']} at {speed}"
    click.echo(
        f"top-1 {result.top1:.2f} %  top-5 {result.top5:.2f} %  on {result.images} images ({speed}); wrote {out}"
    )
    if result.details["skipped_count"]:
        click.secho(
            f"effconv: warning: skipped {result.details['skipped_count']} unreadable image(s), listed in {out}",
            err=True,
            fg="yellow",
        )
    if against is not None:
        _report_against_tf(result.details["against_tf"], out)


def _report_against_tf(figures: dict, out) -> None:
    from effconv.zoo.against_tf import summary_lines

    for line in summary_lines(figures):
        click.echo(line)
    for note in figures["notes"]:
        click.secho(f"effconv: note: {note}", err=True, fg="yellow")
    if not figures["passed"]:
        beyond = figures["beyond_tolerance_count"]
        click.echo(f"FAIL: {beyond} image(s) with logits beyond the tolerance ({figures['tolerance']}); see {out}")
        sys.exit(1)


@main.command()
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="converted X.pth (card beside it)")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="output X.onnx")
@click.option(
    "--input-size", type=click.IntRange(1), help="input side in pixels, fixed in the graph (default: the card's)"
)
@click.option("--atol", default=1e-4, show_default=True, type=float, help="max |onnxruntime - torch| allowed")
@click.option("--no-check", is_flag=True, help="skip the onnxruntime comparison")
@click.option("--opset", type=click.IntRange(18), help="ONNX opset (default: the exporter's)")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("-q", "--quiet", is_flag=True, help="no progress, only the summary")
@handles_errors
def export(weights, onnx_path, input_size, atol, no_check, opset, force, quiet):
    """Export a converted model to ONNX with TF 'SAME' padding fixed for one input size (batch stays free).

    The file carries the model card as ONNX metadata (mean, std, image size, class names; the card as JSON
    under effconv.card). Checked with onnxruntime against PyTorch unless --no-check; exit code 1 if they differ
    beyond --atol.
    """
    from effconv.output.export import RTOL, export_onnx

    status = _StatusLine(quiet)
    try:
        result = export_onnx(
            weights, onnx_path, input_size, force=force, check=not no_check, atol=atol, opset=opset, say=status
        )
    finally:
        status.close()
    size, name = result.input_size, result.output_name
    click.echo(f"exported efficientnet-{result.arch} to {result.path}: [batch, 3, {size}, {size}] -> {name}")
    if len(result.files) > 1:
        click.echo("  with external tensor data: " + ", ".join(str(f) for f in result.files[1:]))
    if result.max_abs_diff is not None:
        click.echo(
            f"  onnxruntime vs PyTorch: max |diff| {result.max_abs_diff:.3g} "
            f"(tolerance {result.limit:.3g}: {atol:g} + {RTOL:g} x max|output|)"
        )


if __name__ == "__main__":
    main()

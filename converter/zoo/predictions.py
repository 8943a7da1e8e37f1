"""The per-image results of an evaluation (`effconv eval --predictions FILE.jsonl|.csv`), written as the run
goes and read back to resume it.

One row per image: its path (relative to the data folder), its label, the top-5 class indices with their
softmax probabilities, and the largest logit; an image that could not be read (`--skip-bad`) has an
`error` instead. The first line names the run (a digest of the weights, the data folder, the number of
images, the preprocessing, the AMP mode): a run that finds another run's rows in the file refuses to mix
them in. Rows are appended and flushed batch by batch, so a process killed outright loses at most the line
it was writing; the next run cuts that torn line off and skips every image with a complete row. At the end
the file is rewritten in the order of the image list (a temporary renamed into place).

JSON Lines: `{"effconv_eval": {...run}}`, then one object per image. CSV: `# effconv eval {...run}`, the
column names, then one line per image (`pandas.read_csv(f, skiprows=1)`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from effconv.errors import UsageError
from effconv.output.writing import writing

TOP = 5
CSV_COLUMNS = ("path", "label", *(f"pred{i}" for i in range(1, TOP + 1)), *(f"prob{i}" for i in range(1, TOP + 1)))
CSV_COLUMNS += ("logit_max", "error")
CSV_MARK = "# effconv eval "
FORMATS = (".jsonl", ".csv")


def rounded(value: float) -> float:
    """A float32 figure with the 9 significant digits that keep it exactly."""
    return float(f"{value:.9g}")


class _BadRow(ValueError):
    pass


class _JsonLines:
    def header(self, run: dict) -> bytes:
        return (json.dumps({"effconv_eval": run}, sort_keys=True) + "\n").encode()

    def read_header(self, lines: list[bytes]) -> tuple[dict | None, int]:
        try:
            head = json.loads(lines[0])
            return head["effconv_eval"], 1
        except (ValueError, KeyError, TypeError):
            return None, 0

    def encode(self, row: dict) -> bytes:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode()

    def decode(self, line: bytes) -> dict:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise _BadRow(f"not JSON ({e})") from None
        if not isinstance(row, dict):
            raise _BadRow("not a JSON object")
        return _checked(row)


class _Csv:
    def header(self, run: dict) -> bytes:
        return (CSV_MARK + json.dumps(run, sort_keys=True) + "\n" + ",".join(CSV_COLUMNS) + "\n").encode()

    def read_header(self, lines: list[bytes]) -> tuple[dict | None, int]:
        text = lines[0].decode(errors="replace")
        columns = lines[1].decode(errors="replace") if len(lines) > 1 else ""
        if not text.startswith(CSV_MARK) or columns != ",".join(CSV_COLUMNS):
            return None, 0
        try:
            return json.loads(text[len(CSV_MARK) :]), 2
        except ValueError:
            return None, 0

    def encode(self, row: dict) -> bytes:
        top = [*row.get("top5", ()), *[""] * TOP][:TOP]
        probs = [*(f"{p:.9g}" for p in row.get("prob5", ())), *[""] * TOP][:TOP]
        logit = f"{row['logit_max']:.9g}" if "logit_max" in row else ""
        out = io.StringIO()
        cells = [row["path"], row["label"], *top, *probs, logit, row.get("error", "")]
        csv.writer(out, lineterminator="\n").writerow(cells)
        return out.getvalue().encode()

    def decode(self, line: bytes) -> dict:
        try:
            cells = next(csv.reader([line.decode()]))
        except (UnicodeDecodeError, csv.Error, StopIteration) as e:
            raise _BadRow(f"not a CSV line ({e})") from None
        if len(cells) != len(CSV_COLUMNS):
            raise _BadRow(f"{len(cells)} cells, not {len(CSV_COLUMNS)}")
        path, label, *rest = cells
        top, probs, (logit, error) = rest[:TOP], rest[TOP : 2 * TOP], rest[2 * TOP :]
        try:
            row: dict = {"path": path, "label": int(label)}
            if error:
                row["error"] = error
            else:
                row["top5"] = [int(x) for x in top if x]
                row["prob5"] = [float(x) for x in probs if x]
                row["logit_max"] = float(logit)
        except ValueError as e:
            raise _BadRow(str(e)) from None
        return _checked(row)


def _checked(row: dict) -> dict:
    if not isinstance(row.get("path"), str) or not isinstance(row.get("label"), int):
        raise _BadRow("no path and label")
    if "error" in row:
        return row
    top, probs = row.get("top5"), row.get("prob5")
    if not (isinstance(top, list) and isinstance(probs, list) and 0 < len(top) == len(probs) <= TOP):
        raise _BadRow("no top-5 classes and probabilities")
    if not isinstance(row.get("logit_max"), (int, float)):
        raise _BadRow("no logit_max")
    return row


def _format_of(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _JsonLines()
    if suffix == ".csv":
        return _Csv()
    raise UsageError(f"--predictions {path}: the file must end in .jsonl (JSON Lines) or .csv")


class PredictionsFile:
    """The predictions of one run, appended as they come and resumable (see the module's notes)."""

    def __init__(self, path: str | os.PathLike, run: dict):
        self.path = Path(path)
        self.run = json.loads(json.dumps(run, sort_keys=True))  # as read back: tuples become lists
        self.format = _format_of(self.path)
        if not self.path.parent.is_dir():
            raise UsageError(f"--predictions: the folder {self.path.parent} does not exist")
        self._lines: dict[str, bytes] = {}  # path -> its row as written
        self._file = None

    def resume(self, known: Iterable[str]) -> list[dict]:
        """Open the file for appending; the rows already in it (a torn last line cut off), or [] for a new file.

        Rows of another run, rows the format does not allow, and rows of images outside `known` are refused.
        """
        kept = 0
        rows: list[dict] = []
        if self.path.exists():
            kept, rows = self._read(set(known))
        with writing(self.path):
            self._file = open(self.path, "r+b" if kept else "wb", buffering=0)  # noqa: SIM115 (closed by close())
            self._file.truncate(kept)
            self._file.seek(kept)
            if not kept:
                self._write(self.format.header(self.run))
        return rows

    def _read(self, known: set[str]) -> tuple[int, list[dict]]:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --predictions {self.path}: {e.strerror or e}") from e
        if self.format.header(self.run).startswith(data):
            return 0, []  # empty, or killed while its header was being written
        complete = data[: data.rfind(b"\n") + 1]  # after the last newline: a line torn by a kill
        lines = complete.split(b"\n")[:-1]
        run, first = self.format.read_header(lines) if lines else (None, 0)
        if run is None:
            raise UsageError(
                f"--predictions {self.path} is not a predictions file of effconv eval; give another file name"
            )
        self._refuse_other_run(run)
        rows = []
        for number, line in enumerate(lines[first:], first + 1):
            try:
                row = self.format.decode(line)
            except _BadRow as e:
                raise UsageError(f"--predictions {self.path}, line {number}: not a row of effconv eval: {e}") from None
            if row["path"] not in known:
                raise UsageError(f"--predictions {self.path}, line {number}: {row['path']} is not among the images")
            if row["path"] in self._lines:
                raise UsageError(f"--predictions {self.path}, line {number}: {row['path']} has a row already")
            self._lines[row["path"]] = line + b"\n"
            rows.append(row)
        return len(complete), rows

    def _refuse_other_run(self, run: dict) -> None:
        changed = [key for key in sorted(set(run) | set(self.run)) if run.get(key) != self.run.get(key)]
        if changed:
            what = ", ".join(f"{key} {_short(run.get(key))} there, {_short(self.run.get(key))} now" for key in changed)
            raise UsageError(
                f"--predictions {self.path} holds the results of another run ({what}); "
                "give another file, or delete it to start over"
            )

    def append(self, rows: Sequence[dict]) -> None:
        """Write `rows` at the end of the file, at once (the operating system has them when this returns)."""
        if not rows:
            return
        lines = [self.format.encode(row) for row in rows]
        for row, line in zip(rows, lines, strict=True):
            self._lines[row["path"]] = line
        self._write(b"".join(lines))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        with writing(self.path):
            while view:
                view = view[self._file.write(view) :]

    def finish(self, order: Sequence[str]) -> str:
        """Rewrite the file in the order of `order` (the image list); returns its sha256."""
        self.close()
        header = self.format.header(self.run)
        lines = [self._lines[path] for path in order if path in self._lines]
        return write_replacing(self.path, [header, *lines])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:20] + "..."


def write_replacing(path: str | os.PathLike, chunks: Iterable[bytes]) -> str:
    """Write a file whole to a hidden temporary, synced, then renamed over `path`; returns its sha256.

    A run stopped in between leaves the old file (or none), never half of one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with writing(path), open(temporary, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        with writing(path):
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return digest.hexdigest()

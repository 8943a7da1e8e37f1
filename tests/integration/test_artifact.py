"""ArtifactWriter: streamed weights equal a torch.save of the same dict; failures leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import OutputError, UsageError
from effconv.output.artifact import ArtifactWriter, read_card, read_weights, write_artifact


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "a.bias": torch.randn(8, generator=gen),
        "b.num_batches_tracked": torch.tensor(0),
    }


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_added_tensors_may_be_reused_by_the_caller(tmp_path, suffix):
    state = _state()
    scratch = torch.empty(1000)
    out = tmp_path / f"x{suffix}"
    with ArtifactWriter(out) as art:
        for name, tensor in state.items():
            if tensor.is_floating_point():  # handed over in a buffer that is overwritten next
                view = scratch[: tensor.numel()].view(tensor.shape)
                view.copy_(tensor)
                tensor = view
            art.add(name, tensor)
            scratch.fill_(float("nan"))
        art.commit({"layout": "native", "arch": "b0", "num_classes": 0}, order=list(reversed(state)))
    loaded = read_weights(out)
    assert list(loaded) == list(reversed(state))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert read_card(out)["file_format"] == ("torch" if suffix == ".pth" else "safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("owned", [False, True])
def test_tensors_of_any_strides_are_written(tmp_path, suffix, owned):
    transposed = torch.arange(12.0).view(3, 4).t()  # not contiguous
    out = tmp_path / f"x{suffix}"
    with ArtifactWriter(out) as art:
        art.add("t", transposed, owned=owned)
        art.commit({"layout": "native", "arch": "b0", "num_classes": 0})
    assert torch.equal(read_weights(out)["t"], transposed)


def test_mmpretrain_layout_wraps_state_dict_and_card(tmp_path):
    out = tmp_path / "m.pth"
    write_artifact(_state(), {"layout": "mmpretrain", "arch": "b0"}, out)
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["state_dict", "meta"] and raw["meta"]["arch"] == "b0"
    assert raw["meta"] == json.loads(out.with_suffix(".json").read_text())
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in _state().items())


def test_leaving_without_commit_writes_nothing_and_keeps_old_files(tmp_path):
    out = tmp_path / "x.pth"
    out.write_bytes(b"old")
    with pytest.raises(KeyError), ArtifactWriter(out, force=True) as art:
        art.add("a", torch.ones(100))
        raise KeyError("interrupted")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]  # temporary removed
    with pytest.raises(UsageError, match="committed or discarded"):
        art.add("b", torch.ones(1))


def test_output_checked_before_any_work(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"old")
    with pytest.raises(UsageError, match="output exists"):
        ArtifactWriter(tmp_path / "x.pth")
    with pytest.raises(UsageError, match="does not exist"):
        ArtifactWriter(tmp_path / "missing" / "x.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]


def test_commit_twice_and_incomplete_order_are_refused(tmp_path):
    with ArtifactWriter(tmp_path / "x.pth") as art:
        art.add("a", torch.ones(1))
        art.add("b", torch.ones(1))
        with pytest.raises(UsageError, match="every tensor"):
            art.commit({"layout": "native"}, order=["a"])
    assert list(tmp_path.iterdir()) == []  # a refused commit discards the artifact
    with ArtifactWriter(tmp_path / "y.pth") as art:
        art.add("a", torch.ones(1))
        art.commit({"layout": "native"})
        with pytest.raises(UsageError, match="already committed"):
            art.commit({"layout": "native"})


# A 2 MB tensor under a 1 MB file-size limit: the write fails as on a full disk (EFBIG instead of ENOSPC).
FULL_DISK = r"""
import resource, signal, sys, torch
from effconv.errors import OutputError
from effconv.output.artifact import write_artifact
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    write_artifact({"w": torch.ones(1 << 19)}, {"layout": "native", "arch": "b0", "num_classes": 0}, sys.argv[1])
except OutputError as e:
    print(f"OutputError: {e}")
"""


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_full_disk_is_an_output_error(tmp_path, suffix):
    out = tmp_path / f"x{suffix}"
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"OutputError: cannot write {out}: ") and "File too large" in done.stdout, done.stdout
    assert "\n" not in done.stdout.strip() and "disk full?" not in done.stdout
    assert list(tmp_path.iterdir()) == []  # no temporary left


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_bug_in_the_write_path_is_raised_as_it_is(tmp_path, suffix, monkeypatch):
    def bug(path):
        raise AttributeError("a bug, not a full disk")

    monkeypatch.setattr("effconv.output.artifact._seal", bug)
    with pytest.raises(AttributeError, match="a bug, not a full disk"):
        write_artifact(_state(), {"layout": "native", "arch": "b0", "num_classes": 0}, tmp_path / f"x{suffix}")
    assert list(tmp_path.iterdir()) == []  # discarded all the same


def test_an_unwritable_folder_is_an_output_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("effconv.output.artifact.tempfile.TemporaryFile", refuse)
    with pytest.raises(OutputError, match="output directory is not writable: .*Permission denied"):
        ArtifactWriter(tmp_path / "x.pth")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_conversion_equals_the_in_memory_one(fixture_ckpt, tmp_path, dtype):
    """The CLI's path (tensors written as converted, buffers reused) gives the in-memory state dict."""
    in_memory = convert_checkpoint(fixture_ckpt, variant="standard", dtype=dtype)
    assert list(in_memory.state_dict) == in_memory.order
    out = tmp_path / "b0.pth"
    with ArtifactWriter(out) as art:
        streamed = convert_checkpoint(fixture_ckpt, variant="standard", dtype=dtype, sink=art.add)
        art.commit(streamed.card, streamed.order)
    assert streamed.state_dict == {} and streamed.order == in_memory.order
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == in_memory.order
    for name, tensor in in_memory.state_dict.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert in_memory.state_dict["blocks.0.dw_bn.running_var"].dtype == torch.float32
    expect = torch.float16 if dtype == "float16" else torch.float32
    assert in_memory.state_dict["stem.conv.weight"].dtype == expect


def test_prefetched_hashes_are_reused_and_changed_files_hashed_again(tmp_path):
    from effconv.output import hashing

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 10)
    hashing.prefetch([a, b])
    first = hashing.hash_in_background([a, b]).result()
    assert first == {"a.bin": hashing.sha256_file(a), "b.bin": hashing.sha256_file(b)}
    b.write_bytes(b"z" * 11)  # changed (size, mtime): its old hash must not be reused
    second = hashing.hash_in_background([a, b]).result()
    assert second["a.bin"] == first["a.bin"] and second["b.bin"] == hashing.sha256_file(b) != first["b.bin"]


def test_local_checkpoint_files_are_what_the_conversion_hashes(fixture_ckpt, tmp_path):
    from effconv.formats.checkpoint_files import local_checkpoint_files

    conversion = convert_checkpoint(fixture_ckpt, variant="standard")
    files = local_checkpoint_files(fixture_ckpt)
    assert sorted(p.name for p in files) == sorted(conversion.card["source"]["sha256"])
    assert local_checkpoint_files(tmp_path / "missing") == ()
    (tmp_path / "x.tar.gz").write_bytes(b"not really")
    assert local_checkpoint_files(tmp_path / "x.tar.gz") == ()


def test_a_failing_sink_stops_the_conversion_with_its_error(fixture_ckpt):
    seen: list[str] = []

    def sink(name: str, tensor: torch.Tensor) -> None:
        if len(seen) == 5:
            raise OSError(28, "No space left on device")
        seen.append(name)

    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(fixture_ckpt, variant="standard", sink=sink)
    assert len(seen) == 5  # the tensors before the failure went through, in order

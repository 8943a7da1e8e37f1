"""The streaming writer gives the file torch.save gives: same records, same tensors, valid zip CRCs."""

from __future__ import annotations

import zipfile

import pytest
import torch

from effconv.errors import UsageError
from effconv.output.streaming_save import StreamingStateDictWriter


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, 3, 3, generator=gen)
    return {
        "conv.weight": big,
        "dw.weight": torch.randn(4, 1, 3, 3, generator=gen).permute(0, 1, 3, 2),  # not contiguous
        "slice": torch.arange(20.0)[5:12],  # a view into a larger storage
        "half": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(3, 2, generator=gen).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(0),
        "empty": torch.zeros(0, 4),
    }


def _records(path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC is right
        return {n.split("/", 1)[1] for n in z.namelist()}


@pytest.mark.parametrize("mmap", [False, True])
def test_streamed_file_loads_like_torch_save(tmp_path, mmap):
    state = _state()
    order = list(reversed(state))
    path = tmp_path / "s.pth"
    with StreamingStateDictWriter(path) as w:
        for name, tensor in state.items():
            w.add(name, tensor)
        w.close(order)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert list(loaded) == order
    for name, tensor in state.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.is_contiguous()
        assert torch.equal(got, tensor), name
        assert got.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    reference = tmp_path / "r.pth"
    torch.save({k: state[k].contiguous() for k in order}, reference)
    assert _records(path) == _records(reference)


def test_a_model_loads_strictly_from_a_streamed_state_dict(tmp_path):
    from effconv.models import create_model

    model = create_model("b0", num_classes=10)
    path = tmp_path / "b0.pth"
    with StreamingStateDictWriter(path) as w:
        for name, tensor in model.state_dict().items():
            w.add(name, tensor)
    fresh = create_model("b0", num_classes=10)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_refuses_duplicates_and_an_incomplete_order(tmp_path):
    w = StreamingStateDictWriter(tmp_path / "x.pth")
    w.add("a", torch.ones(2))
    with pytest.raises(UsageError):
        w.add("a", torch.ones(2))
    with pytest.raises(UsageError):
        w.close(["b"])
    w.close()


# A write that fails (a 1 MB file-size limit standing in for a full disk) while adding a
# tensor, or while closing, is an OSError: torch's own zip writer would end the process from its destructor
# (std::terminate) unless the writer is abandoned properly. The child must raise, go on, exit 0.
FAILING_WRITE = r"""
import gc, resource, signal, sys, torch
from effconv.output.streaming_save import StreamingStateDictWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
sizes = {"add": [100_000] * 4, "close": [(2**20 - 256) // 4]}[sys.argv[2]]
try:
    with StreamingStateDictWriter(sys.argv[1]) as w:
        for i, n in enumerate(sizes):
            w.add(f"t{i}", torch.ones(n))
        print("added all", flush=True)
    print("closed")
except OSError:
    print("failed", flush=True)
del w
gc.collect()
print("alive")
"""


@pytest.mark.parametrize("where", ["add", "close"])
def test_a_failed_write_raises_and_the_process_lives_on(tmp_path, where):
    import subprocess
    import sys

    path = tmp_path / "x.pth"
    done = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(path), where], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = ["failed", "alive"] if where == "add" else ["added all", "failed", "alive"]
    assert done.stdout.split("\n")[:-1] == expected, done.stdout + done.stderr[-2000:]


def test_wrapped_state_dict_with_meta(tmp_path):
    path = tmp_path / "w.pth"
    with StreamingStateDictWriter(path) as w:
        w.add("a", torch.ones(3))
        w.close(wrap_key="state_dict", meta={"arch": "b0", "sizes": [1, 2], "none": None})
    loaded = torch.load(path, weights_only=True)
    assert loaded["meta"] == {"arch": "b0", "sizes": [1, 2], "none": None}
    assert list(loaded) == ["state_dict", "meta"] and torch.equal(loaded["state_dict"]["a"], torch.ones(3))


def test_nothing_can_be_added_after_close_or_abort(tmp_path):
    w = StreamingStateDictWriter(tmp_path / "x.pth")
    w.close()
    with pytest.raises(UsageError):
        w.add("a", torch.ones(1))
    w = StreamingStateDictWriter(tmp_path / "y.pth")
    w.abort()
    w.abort()  # twice is harmless
    with pytest.raises(UsageError):
        w.add("a", torch.ones(1))

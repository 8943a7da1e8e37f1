"""The streaming writer gives the file torch.save gives: same records, same tensors, valid zip CRCs."""

from __future__ import annotations

import zipfile

import pytest
import torch

from effconv.errors import UsageError
from effconv.streaming_save import StreamingStateDictWriter


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

"""The squared gradient norm (meshtrain.grads.square_sum) equals an fp64 sum of squares: fp32
gradients in whole rows of ROW elements, with a remainder, shorter than a row, and other dtypes.
Averaging over dp (meshtrain.grads.average) reduces large gradients in place and small ones in
buckets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshtrain import grads
from meshtrain.grads import ROW, average, buckets, square_sum


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((300, ROW), torch.float32),
        ((17, ROW + 3), torch.float32),
        ((ROW - 1,), torch.float32),
        ((50, 100), torch.bfloat16),
        ((50, 100), torch.float64),
    ],
)
def test_square_sum_is_the_fp64_sum_of_squares(shape, dtype):
    grad = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    expected = float(grad.double().square().sum())
    found = square_sum(grad)
    assert found.dtype == torch.float64
    assert abs(float(found) - expected) <= 1e-8 * expected


def test_buckets_keep_order_and_put_large_gradients_alone():
    small, big = torch.zeros(4), torch.zeros(64)  # 16 and 256 bytes
    other = torch.zeros(4, dtype=torch.float64)
    found = buckets([small, small, big, small, small, small, other, small], limit=40)
    sizes = [[g.numel() * g.element_size() for g in bucket] for bucket in found]
    assert sizes == [[16, 16], [256], [16, 16], [16], [32], [16]]


def test_average_reduces_large_gradients_in_place_and_small_ones_in_buckets(monkeypatch):
    reduced = []

    def all_reduce(tensor, group):  # two ranks holding the same gradients
        reduced.append(tensor.data_ptr())
        tensor.mul_(2)

    monkeypatch.setattr(grads, "BUCKET_BYTES", 1024)
    monkeypatch.setattr(grads.dist, "all_reduce", all_reduce)
    shapes = [(300,), (3,), (40, 40), (5, 2), (7,)]  # 1200 B, 12, 6400, 40, 28
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    expected = []
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        expected.append(p.grad.clone() / 2)
    params[2].grad = params[2].grad.t()  # large but not contiguous: reduced through a copy
    expected[2] = expected[2].t()
    average(params, group=object(), size=2, divisor=4)
    for p, want in zip(params, expected, strict=True):
        assert torch.equal(p.grad, want)
    assert len(reduced) == 4  # [1200 B], [12 B], [6400 B], [40 B, 28 B]
    assert reduced[0] == params[0].grad.data_ptr()
    assert reduced[2] != params[2].grad.data_ptr()

"""The squared gradient norm (meshtrain.grads.square_sum) equals an fp64 sum of squares: fp32
gradients in whole rows of ROW elements, with a remainder, shorter than a row, and other dtypes."""

from __future__ import annotations

import pytest
import torch

from meshtrain.grads import ROW, square_sum


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

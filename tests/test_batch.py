"""`meshtrain.step.as_batch`: what the core accepts from a data stream (no process group).

python -m pytest -q tests/test_batch.py
"""

import pytest
import torch

from meshtrain.contracts import IGNORE_INDEX, Batch
from meshtrain.errors import UserError
from meshtrain.step import as_batch


def test_batch_passes_through_and_labels_may_be_masked():
    inputs = torch.tensor([[1, 2, 3]])
    labels = torch.tensor([[2, IGNORE_INDEX, 4]])
    got = as_batch(Batch(inputs=inputs, labels=labels))
    assert torch.equal(got.inputs, inputs) and torch.equal(got.labels, labels)


def test_legacy_single_tensor_is_read_as_shifted_inputs_and_labels():
    window = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])  # (n, T + 1)
    got = as_batch(window)
    assert torch.equal(got.inputs, window[:, :-1]) and torch.equal(got.labels, window[:, 1:])


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (torch.tensor([[3, IGNORE_INDEX, 4, 5]]), "negative input ids"),  # -100 in the inputs
        (Batch(inputs=torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4)), "one shape"),
        ("tokens", "expected a meshtrain Batch"),
    ],
)
def test_bad_batches_name_the_data_source(value, fragment):
    with pytest.raises(UserError) as info:
        as_batch(value)
    (line,) = info.value.problems
    assert line.startswith("data.source: ") and fragment in line

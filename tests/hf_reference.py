"""What the Hugging Face tests compare against: the synthetic global batches every layout sees,
and transformers' own logits and loss on one of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from meshtrain.contracts import Batch, DataContext

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 32, 512


def global_batches(count: int) -> list[Batch]:
    """The first `count` global batches (GLOBAL_BATCH rows of SEQ_LEN), from the data plugin."""
    from meshtrain.plugins import Plugins

    source = Plugins().get("data_sources", "synthetic", "data.source")
    ctx = DataContext(
        seq_len=SEQ_LEN,
        micro_batch_size=GLOBAL_BATCH,
        grad_acc=1,
        dp=1,
        dp_rank=0,
        seed=0,
        vocab_size=VOCAB,
        run_dir=Path("."),
        cache_dir=Path("."),
    )
    stream = source.open(source.config_class(), ctx)
    return [stream.next_batch() for _ in range(count)]


def hf_logits_and_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, float]:
    """transformers' logits (B, T, V) and its own causal-LM loss on the batch's labels as given
    (`shift_labels`: not shifted again), the mean CE over every target token, as meshtrain's."""
    with torch.no_grad():
        out = model(input_ids=batch.inputs, labels=batch.labels, shift_labels=batch.labels)
    mean = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten())
    assert torch.allclose(out.loss, mean, rtol=1e-6)  # the loss meshtrain means
    return out.logits, float(out.loss)


def write_config(path: Path, folder: Path, steps: int = 5) -> Path:
    """A run config whose family and architecture come only from the Hugging Face folder."""
    path.write_text(
        f'[model]\nname = "{folder}"\npretrained = true\n\n'
        '[data]\nsource = "synthetic"\n\n'
        f"[train]\nseq_len = {SEQ_LEN}\nsteps = {steps}\nlr = 1e-3\nwarmup_steps = 0\n"
        "grad_acc = 2\n\n"
        '[checkpoint]\nevery = 0\nresume = "never"\n'
    )
    return path

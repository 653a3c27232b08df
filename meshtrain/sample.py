"""`meshtrain sample`: text from a trained checkpoint, for a quick look at what the model learned.

    meshtrain sample runs/tiny_cpu --prompt "def main(" --max-new-tokens 40
    meshtrain sample runs/tiny_cpu/checkpoints/step_00000010 --prompt "The" --temperature 0

One process, no process group: the whole model is read from the checkpoint as `meshtrain export`
reads it (the transformers model class of the family, fp32 on CPU), the prompt is encoded with
the run's own tokenizer (`<run.dir>/tokenizer/`) and transformers' `generate` continues it:
greedy at temperature 0, else sampled from `--seed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshtrain.errors import UserError


def sample(
    source: Path,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """The prompt and its continuation, decoded."""
    if not prompt.strip():
        raise UserError("sample: --prompt is empty; give some text for the model to continue")
    if max_new_tokens < 1:
        raise UserError(f"sample: --max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"sample: --temperature must be >= 0, got {temperature}")
    from meshtrain.export import load_full_model, resolve_checkpoint

    path = resolve_checkpoint(source, "sample")
    tokenizer = load_run_tokenizer(path)
    _, model = load_full_model(path)
    if not hasattr(model, "generate"):
        raise UserError(
            f"sample: the model in {path} ({type(model).__name__}) has no generate(); "
            "its family builds no transformers model"
        )
    return generate(model, tokenizer, prompt, max_new_tokens, temperature, seed)


def load_run_tokenizer(checkpoint: Path) -> Any:
    """The tokenizer the run trained with: `<run.dir>/tokenizer/` beside `checkpoints/`."""
    folder = checkpoint.parent.parent / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(
            f"sample: the run has no tokenizer at {folder} (the data source saves it there); "
            "copy the tokenizer the run trained with into that folder"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"sample: cannot load the tokenizer in {folder}: {err}") from None


def generate(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float, seed: int
) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        raise UserError("sample: --prompt encodes to no tokens")
    if int(ids.max()) >= model.config.vocab_size:
        raise UserError(
            "sample: the run's tokenizer gives ids beyond the model's vocabulary "
            f"({int(ids.max())} >= {model.config.vocab_size})"
        )
    torch.manual_seed(seed)
    greedy = temperature == 0
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)

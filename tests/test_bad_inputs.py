"""A corpus of user mistakes: each exits 2 with one `error:` line per problem, names the key or
file, prints no traceback and leaves what was already written alone.

Every case builds its files in a fresh folder and calls `meshtrain.cli.main` in-process (its
return value is the exit status); most are `meshtrain check`, which runs every check `run` does
before a worker starts. A few need `run` itself (problems found while preparing the data, a disk
that fills during a checkpoint save), in a world of one process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from meshtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.toml"
MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
}


def toml(tables: dict[str, dict]) -> str:
    from meshtrain.cli import toml_value

    return "".join(
        f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()) + "\n"
        for table, keys in tables.items()
    )


def config(tmp: Path, text: str = "", name: str = "run.toml") -> Path:
    """A config inheriting configs/tiny_cpu.toml, its runs under `tmp`."""
    path = tmp / name
    path.write_text(f'base = "{TINY}"\n[run]\ndir = "{tmp / "run"}"\n' + text)
    return path


def hf_model(folder: Path, **overrides) -> Path:
    """A tiny llama saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**MODEL, **overrides})).save_pretrained(folder)
    return folder


def pretrained(tmp: Path, folder: Path) -> Path:
    """A config whose model is only `folder` (no architecture keys of its own)."""
    path = tmp / "pretrained.toml"
    path.write_text(
        f'[run]\ndir = "{tmp / "run"}"\n[model]\nname = "{folder}"\npretrained = true\n'
        '[data]\nsource = "synthetic"\n[train]\nseq_len = 32\n'
    )
    return path


def tokenizer(folder: Path) -> Path:
    from meshtrain_data.tokenizer import train_byte_level_bpe

    texts = [f"document {i} about meshtrain" for i in range(50)]
    train_byte_level_bpe(iter(texts), 300).save_pretrained(str(folder))
    return folder


def hf_data(tmp: Path, data: str | bytes, extra: str = "", *, tok: bool = True) -> Path:
    raw = data if isinstance(data, bytes) else data.encode()
    (tmp / "data.jsonl").write_bytes(raw)
    tok_line = f'tokenizer = "{tokenizer(tmp / "tok")}"\n' if tok else ""
    return config(
        tmp, f'[data]\nsource = "hf"\ndataset = "{tmp / "data.jsonl"}"\n{tok_line}{extra}'
    )


def fake_checkpoint(tmp: Path, **shape) -> Path:
    """A complete-looking checkpoint folder whose meta.json describes another model."""
    from dataclasses import asdict

    from meshtrain.config import load_config
    from meshtrain.job import resolve_job

    real = asdict(resolve_job(load_config(TINY)).shape)
    step = tmp / "old" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    meta = {"step": 2, "family": "llama", "shape": {**real, **shape}}
    (step / "meta.json").write_text(json.dumps(meta))
    (step / ".metadata").write_bytes(b"")
    return step


Case = Callable[[Path], list[str]]
"""Builds its files under a fresh folder and returns the command line."""

CASES: dict[str, tuple[Case, list[str]]] = {
    # ---- the TOML file and the command line
    "toml syntax": (
        lambda t: ["check", str(_write(t / "run.toml", "[parallel\ndp = 2\n"))],
        ["run.toml", "invalid TOML"],
    ),
    "config file missing": (lambda t: ["check", str(t / "absent.toml")], ["absent.toml"]),
    "config is a folder": (lambda t: ["check", str(_folder(t / "cfgdir", "a", "b"))], ["cfgdir"]),
    "unknown table": (
        lambda t: ["check", str(config(t, "[parallell]\ndp = 2\n"))],
        ["parallell: unknown table"],
    ),
    "unknown key": (
        lambda t: ["check", str(config(t, "[parallel]\ntpp = 2\n"))],
        ["parallel.tpp: unknown key (did you mean parallel.tp?)"],
    ),
    "wrong type": (
        lambda t: ["check", str(config(t, '[parallel]\ndp = "two"\n'))],
        ["parallel.dp: expected an integer"],
    ),
    "below its minimum": (
        lambda t: ["check", str(config(t, "[parallel]\ndp = 0\n"))],
        ["parallel.dp"],
    ),
    "not a choice": (
        lambda t: ["check", str(config(t, '[train]\nprecision = "fp8"\n'))],
        ["train.precision", "fp8"],
    ),
    "--set without =": (
        lambda t: ["check", str(config(t)), "--set", "parallel.dp"],
        ["--set", "parallel.dp"],
    ),
    "--set value not TOML": (
        lambda t: ["check", str(config(t)), "--set", "train.lr=3e-3e"],
        ["train.lr: expected a number, got '3e-3e'"],
    ),
    "--set unknown key": (
        lambda t: ["check", str(config(t)), "--set", "parallel.foo=1"],
        ["parallel.foo: unknown key"],
    ),
    "base file missing": (
        lambda t: ["check", str(_write(t / "run.toml", 'base = "nope.toml"\n'))],
        ["base: file not found", "nope.toml"],
    ),
    # ---- plugins
    "unknown family": (
        lambda t: ["check", str(config(t, '[model]\nfamily = "lama"\n'))],
        ["model.family: unknown model family 'lama' (did you mean llama?)"],
    ),
    "unknown schedule": (
        lambda t: ["check", str(config(t, '[pipeline]\nschedule = "1f1c"\n'))],
        ["pipeline.schedule", "1f1c"],
    ),
    "unknown data source": (
        lambda t: ["check", str(config(t, '[data]\nsource = "hff"\n'))],
        ["data.source", "hff"],
    ),
    "disabling an unknown plugin": (
        lambda t: ["check", str(config(t, '[plugins]\ndisable = ["meshtrain_modles"]\n'))],
        ["plugins.disable", "meshtrain_modles"],
    ),
    # ---- the model
    "hidden size not divisible by heads": (
        lambda t: ["check", str(config(t, "[model]\nnum_attention_heads = 7\n"))],
        ["model.hidden_size: 64 is not divisible by model.num_attention_heads (7)"],
    ),
    "misspelt model key": (
        lambda t: ["check", str(config(t, "[model]\nnum_hiden_layers = 2\n"))],
        ["model.num_hiden_layers: unknown key (did you mean model.num_hidden_layers?)"],
    ),
    "model key of the wrong type": (
        lambda t: ["check", str(config(t, '[model]\nhidden_size = "64"\n'))],
        ["model.hidden_size: expected an integer"],
    ),
    "an activation transformers lacks": (
        lambda t: ["check", str(config(t, '[model]\nhidden_act = "gelux"\n'))],
        ["model.hidden_act: unknown activation 'gelux' (did you mean gelu?)"],
    ),
    "a padding id outside the vocabulary": (
        lambda t: ["check", str(config(t, "[model]\npad_token_id = 5000\n"))],
        ["model.pad_token_id: 5000 is outside the vocabulary (model.vocab_size = 2048)"],
    ),
    "config.json not JSON": (
        lambda t: ["check", str(pretrained(t, _folder(t / "m", "config.json", "{not json")))],
        ["model.name", "config.json is not valid JSON"],
    ),
    "config.json not an object": (
        lambda t: ["check", str(pretrained(t, _folder(t / "m", "config.json", "[1, 2]")))],
        ["model.name", "config.json names no model_type"],
    ),
    "model folder without config.json": (
        lambda t: ["check", str(pretrained(t, _folder(t / "m", "README.md", "hi")))],
        ["model.name", "has no config.json"],
    ),
    "unknown model_type": (
        lambda t: [
            "check",
            str(pretrained(t, _folder(t / "m", "config.json", '{"model_type": "bert"}'))),
        ],
        ["model.name", "'bert'"],
    ),
    "family that does not train the folder's model_type": (
        lambda t: [
            "check",
            str(
                config(t, f'[model]\nfamily = "qwen3"\nname = "{hf_model(t / "m")}"\n'),
            ),
        ],
        ["model.name", "'llama' model; this family trains qwen3"],
    ),
    "pretrained without a name": (
        lambda t: ["check", str(config(t, "[model]\npretrained = true\n"))],
        ["model.pretrained: true needs model.name"],
    ),
    "safetensors truncated": (
        lambda t: ["check", str(pretrained(t, _truncate(hf_model(t / "m"))))],
        ["model.name", "model.safetensors is not a readable safetensors file"],
    ),
    "safetensors of another shape": (
        lambda t: ["check", str(pretrained(t, _other_weights(t, intermediate_size=96)))],
        ["model.name", "model.layers.0.mlp.gate_proj.weight has shape [96, 64]"],
    ),
    "safetensors with integer weights": (
        lambda t: ["check", str(pretrained(t, _integer_weights(hf_model(t / "m"))))],
        ["model.name", "model.norm.weight holds I64, not floating-point weights"],
    ),
    # ---- degrees against the model
    "tp does not divide the heads": (
        lambda t: ["check", str(config(t, "[parallel]\ntp = 3\n"))],
        ["parallel.tp: 3 does not divide model.num_attention_heads (4)"],
    ),
    "more stages than layers": (
        lambda t: ["check", str(config(t, "[parallel]\npp = 8\n[train]\ngrad_acc = 8\n"))],
        ["parallel.pp", "layers"],
    ),
    "1F1B with fewer micro-batches than stages": (
        lambda t: ["check", str(config(t, "[parallel]\npp = 2\n[train]\ngrad_acc = 1\n"))],
        ["train.grad_acc: 1 micro-batches is fewer than parallel.pp (2)"],
    ),
    "sequence longer than the model's positions": (
        lambda t: ["check", str(config(t, "[train]\nseq_len = 512\n"))],
        ["train.seq_len: 512 exceeds the model's 256 positions"],
    ),
    # ---- data
    "dataset file missing": (
        lambda t: [
            "check",
            str(
                config(
                    t,
                    f'[data]\nsource = "hf"\ndataset = "{t / "nope.jsonl"}"\n'
                    f'tokenizer = "{tokenizer(t / "tok")}"\n',
                )
            ),
        ],
        ["data.dataset: file not found", "nope.jsonl"],
    ),
    "missing tokenizer and missing column, both at once": (
        lambda t: [
            "check",
            str(
                hf_data(
                    t,
                    '{"text": "a"}\n',
                    f'tokenizer = "{t / "notok"}"\ntext_column = "body"\n',
                    tok=False,
                )
            ),
        ],
        ["data.text_column: 'body' is not a column", "data.tokenizer: folder not found"],
    ),
    "tokenizer folder without its files": (
        lambda t: [
            "check",
            str(
                hf_data(
                    t,
                    '{"text": "a"}\n',
                    f'tokenizer = "{_folder(t / "tok2", "README.md", "x").as_posix()}"\n',
                    tok=False,
                )
            ),
        ],
        ["data.tokenizer: cannot load a tokenizer from folder"],
    ),
    "empty data file": (
        lambda t: ["check", str(hf_data(t, ""))],
        ["data.dataset", "is empty"],
    ),
    "text column of numbers": (
        lambda t: ["check", str(hf_data(t, '{"text": 3}\n{"text": 4}\n'))],
        ["data.text_column: 'text'", "not text"],
    ),
    "eval_split is the training split": (
        lambda t: ["check", str(hf_data(t, '{"text": "a"}\n', 'eval_split = "train"\n'))],
        ["data.eval_split: 'train'", "is the training data"],
    ),
    "eval_share of 1.5": (
        lambda t: ["check", str(config(t, "[data]\neval_share = 1.5\n"))],
        ["data.eval_share: 1.5 is out of range"],
    ),
    "offline vocabulary larger than the model's too small": (
        lambda t: ["check", str(config(t, "[model]\nvocab_size = 200\n"))],
        ["data.vocab_size: model.vocab_size = 200 is too small"],
    ),
    "eval steps of 0": (
        lambda t: ["check", str(config(t, "[eval]\nevery = 2\nsteps = 0\n"))],
        ["eval.steps"],
    ),
    "data file not UTF-8 (run)": (
        lambda t: ["run", str(hf_data(t, b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))],
        ["data.dataset", "data.jsonl:2: not UTF-8"],
    ),
    "data file with a line that is not JSON (run)": (
        lambda t: ["run", str(hf_data(t, '{"text": "ok"}\n{"text": "ok"}\nnot json\n'))],
        ["data.dataset", "data.jsonl:3: not a JSON object per line"],
    ),
    # ---- run dir, checkpoints, export, sample
    "run dir under a file": (
        lambda t: ["check", str(config(t)), "--set", f'run.dir="{_write(t / "afile", "x")}/sub"'],
        ["run.dir", "afile is a file"],
    ),
    "resume from a checkpoint of another model": (
        lambda t: [
            "check",
            str(
                config(t, f'[checkpoint]\nresume = "{fake_checkpoint(t, hidden_size=32)}"\n'),
            ),
        ],
        ["checkpoint.resume", "holds a different model (hidden_size 32 vs 64)"],
    ),
    "resume path that does not exist": (
        lambda t: ["check", str(config(t, f'[checkpoint]\nresume = "{t / "nope"}"\n'))],
        ["checkpoint.resume", "nope"],
    ),
    "export into a non-empty folder": (
        lambda t: ["export", str(fake_checkpoint(t)), str(_folder(t / "out", "keep.txt", "x"))],
        ["export", "already exists and is not empty"],
    ),
    "export of a folder that is no run": (
        lambda t: ["export", str(_folder(t / "x", "a.txt", "x")), str(t / "out")],
        ["export", "is not a meshtrain run dir"],
    ),
    "sample from nothing": (
        lambda t: ["sample", str(t / "nope"), "--prompt", "hi"],
        ["sample", "does not exist"],
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="latin-1")
    return path


def _folder(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def _truncate(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def _other_weights(tmp: Path, **overrides) -> Path:
    """config.json of the default tiny model beside weights of another shape."""
    folder = hf_model(tmp / "m", **overrides)
    other = hf_model(tmp / "default")
    (folder / "config.json").write_text((other / "config.json").read_text())
    return folder


def _integer_weights(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].long()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_the_corpus_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_naming_it(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, named = CASES[case]
    argv = build(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 2, capsys.readouterr()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err and out == "", (out, err)
    for fragment in named:
        assert any(fragment in line for line in lines), (fragment, lines)
    for path, mtime in before.items():  # nothing that existed was changed or removed
        assert path.is_file() and path.stat().st_mtime_ns == mtime, path


def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The step-4 save fails with ENOSPC: exit 2 naming the checkpoint, step 2's stays whole."""
    import errno

    import torch.distributed.checkpoint as dcp

    from meshtrain.checkpoint import is_complete

    real_save = dcp.save

    def save(states, checkpoint_id):
        if str(checkpoint_id).endswith("step_00000004.partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(states, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", save)
    path = config(
        tmp_path,
        '[train]\nsteps = 4\n[checkpoint]\nevery = 2\nresume = "never"\n[data]\nsource = '
        '"synthetic"\n',
    )
    assert main(["run", str(path)]) == 2
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    assert is_complete(root / "step_00000002")

"""Native checkpoints: exact resume, resharding between layouts, killed saves, worker restarts,
safe loading.

The tiny config (offline corpus) at a global batch of 4 sequences, 4 steps, in three spawned worlds:

    world 1: ref    one process, checkpoints at steps 2 and 4
    world 8: full   dp2 pp2 tp2 + FSDP2, a checkpoint every step (keep 3)
             same   resumes full's step 2 in the same layout: steps 3-4 bitwise equal to full
             up     resumes ref's step 2 (1 process -> 8): steps 3-4 within 1e-5 of ref
    world 1: down   resumes full's step 2 (8 -> 1) with resume = "auto", next to a killed save

Every run evaluates on held-out data after steps 2 and 4: a resumed run's evaluation equals the
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshtrain import checkpoint, resume
from meshtrain.cli import main
from meshtrain.config import load_config
from meshtrain.contracts import IGNORE_INDEX
from meshtrain.errors import UserError
from tests.spawn import run_world, worker_pids

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.toml")
RTOL = 1e-5
SINGLE = ["parallel.dp=1", "parallel.pp=1", "parallel.tp=1", "train.micro_batch_size=2"]
FULL = [
    "parallel.dp=2",
    "parallel.pp=2",
    "parallel.tp=2",
    "parallel.dp_shard=true",
    "train.micro_batch_size=1",
]


def overrides(
    layout: list[str],
    run_dir: Path,
    resume: str = "never",
    every: int = 0,
    keep: int = 3,
    steps: int = 4,
) -> list[str]:
    return [
        *layout,
        "train.grad_acc=2",
        f"train.steps={steps}",
        f"checkpoint.every={every}",
        f"checkpoint.keep={keep}",
        f'checkpoint.resume="{resume}"',
        f'run.dir="{run_dir}"',
        "eval.every=2",  # held-out loss after steps 2 and 4: the same batches after a resume
        "eval.steps=2",
    ]


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    d = {name: out / name for name in ("ref", "full", "same", "up", "down")}
    (ref,) = run_world(1, [(CONFIG, overrides(SINGLE, d["ref"], every=2))], out)
    full, same, up = run_world(
        8,
        [
            (CONFIG, overrides(FULL, d["full"], every=1)),
            (CONFIG, overrides(FULL, d["same"], resume=str(step_dir(d["full"], 2)))),
            (CONFIG, overrides(FULL, d["up"], resume=str(step_dir(d["ref"], 2)))),
        ],
        out,
    )
    # A run dir whose newest saves were killed mid-write: a .partial folder and a step folder
    # without meta.json, both newer than the one complete checkpoint.
    root = d["down"] / "checkpoints"
    shutil.copytree(step_dir(d["full"], 2), root / "step_00000002")
    for junk in (root / ".step_00000003.partial", root / "step_00000003"):
        junk.mkdir(parents=True)
        (junk / "__0_0.distcp").write_bytes(b"half written")
    (down,) = run_world(1, [(CONFIG, overrides(SINGLE, d["down"], resume="auto"))], out)
    return {"dirs": d, "ref": ref, "full": full, "same": same, "up": up, "down": down}


@pytest.mark.dist
def test_checkpoint_folder_is_complete_and_pruned(runs):
    root = runs["dirs"]["full"] / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step_{s:08d}" for s in (2, 3, 4)]
    ckpt = root / "step_00000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world"] == 8 and meta["layout"] == [2, 2, 2, True]
    assert meta["config"]["parallel"]["tp"] == 2 and meta["family"] == "llama"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(8)]
    assert len(list(ckpt.glob("*.distcp"))) == 8 and (ckpt / ".metadata").is_file()
    extra = torch.load(ckpt / "rank5.pt", weights_only=True)
    assert set(extra) == {"rng", "data"}


@pytest.mark.dist
def test_resume_same_layout_is_bitwise_exact(runs):
    full, same = runs["full"], runs["same"]
    assert [m["step"] for m in same] == [3, 4]
    for got, want in zip(same, full[2:], strict=True):
        assert (got["loss"], got["grad_norm"], got["lr"]) == (
            want["loss"],
            want["grad_norm"],
            want["lr"],
        ), f"step {want['step']}"
    assert same[1]["eval_loss"] == full[3]["eval_loss"] and "eval_loss" not in same[0]


@pytest.mark.dist
@pytest.mark.parametrize("name", ["up", "down"])
def test_resume_into_another_layout_continues(runs, name):
    ref, full, run = runs["ref"], runs["full"], runs[name]
    assert [m["step"] for m in run] == [3, 4]
    for got, want in zip(run, ref[2:], strict=True):
        assert got["lr"] == want["lr"]
        for key in ("loss", "grad_norm"):
            assert abs(got[key] - want[key]) <= RTOL * abs(want[key]), (
                f"{name} step {want['step']}: {key} {got[key]} vs 1 process {want[key]}"
            )
    got, want = run[1]["eval_loss"], ref[3]["eval_loss"]  # the evaluation after step 4
    assert abs(got - want) <= RTOL * want, f"{name}: eval_loss {got} vs 1 process {want}"
    # The 8-rank run itself matches the single process before and after the save.
    for got, want in zip(full, ref, strict=True):
        assert abs(got["loss"] - want["loss"]) <= RTOL * abs(want["loss"])


@pytest.mark.dist
def test_sample_continues_a_prompt_with_meshtrains_own_forward(runs, tmp_path, capsys):
    """`meshtrain sample` on the dp2 pp2 tp2 run prints the prompt and a continuation; the
    transformers model it generates with gives the logits of meshtrain's own stage forward, and
    greedy decoding's first new token is that forward's argmax. Bad inputs exit 2 by name."""
    from meshtrain.export import load_full_model, resolve_checkpoint
    from meshtrain.sample import load_run_tokenizer

    run_dir, prompt = runs["dirs"]["full"], "def main(argv):\n    "
    argv = ["sample", str(run_dir), "--prompt", prompt, "--max-new-tokens", "6"]
    assert main([*argv, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out.rstrip("\n")
    assert greedy.startswith(prompt) and len(greedy) > len(prompt)
    assert main([*argv, "--seed", "1"]) == main([*argv, "--seed", "1"]) == 0
    twice = capsys.readouterr().out
    once = twice[: len(twice) // 2]
    assert twice == once * 2 and once.startswith(prompt)  # one seed, one sample

    checkpoint = resolve_checkpoint(run_dir)
    tokenizer = load_run_tokenizer(checkpoint)
    family, model = load_full_model(checkpoint)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    stage = family.split(model, range(4), first=True, last=True, sequence_shards=1)
    with torch.no_grad():
        ours, theirs = stage(ids), model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    new = tokenizer(greedy, add_special_tokens=False)["input_ids"]
    assert new[: ids.shape[1]] == ids[0].tolist()
    assert new[ids.shape[1]] == int(ours[0, -1].argmax())

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare / "checkpoints" / checkpoint.name)  # no tokenizer/
    for args, named in [
        (["sample", str(run_dir), "--prompt", ""], "--prompt is empty"),
        (["sample", str(empty), "--prompt", "x"], "no complete checkpoint"),
        (["sample", str(bare), "--prompt", "x"], f"no tokenizer at {bare / 'tokenizer'}"),
        (["sample", str(run_dir), "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0] and "Traceback" not in err[0], err


@pytest.mark.dist
def test_export_of_sharded_checkpoint_computes_the_same_loss(runs, tmp_path):
    """dp2 pp2 tp2 FSDP2 checkpoint -> Hugging Face folder: its loss on the next global batch
    equals the loss meshtrain logged for that step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshtrain.job import resolve_job
    from meshtrain.preflight import context

    run_dir, out = runs["dirs"]["full"], tmp_path / "hf"
    assert main(["export", str(step_dir(run_dir, 2)), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).vocab_size <= 2048
    model = AutoModelForCausalLM.from_pretrained(out)
    job = resolve_job(load_config(Path(CONFIG), overrides(SINGLE, run_dir)))
    ctx = dataclasses.replace(
        context(job.config, job.shape.vocab_size, 0), micro_batch_size=4, grad_acc=1
    )
    stream = job.source.open(job.data_options, ctx)
    for _ in range(3):
        inputs, labels = stream.next_batch()  # (4, T) each: the global batch of step 3
    with torch.no_grad():
        logits = model(inputs).logits  # (4, T, V)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )
    want = runs["full"][2]["loss"]
    assert abs(float(loss) - want) <= RTOL * want, f"{float(loss)} vs meshtrain {want}"


def test_resume_auto_skips_unfinished_saves(tmp_path):
    cfg = load_config(Path(CONFIG), [f'run.dir="{tmp_path}"'])
    root = tmp_path / "checkpoints"
    assert resume.find_resume(cfg) is None
    for step in (1, 2):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "meta.json").write_text("{}")
    (root / ".step_00000004.partial").mkdir()
    (root / ".step_00000004.partial" / "meta.json").write_text("{}")  # renamed last: not done
    (root / "step_00000003").mkdir()  # no meta.json
    assert resume.find_resume(cfg) == root / "step_00000002"
    never = load_config(Path(CONFIG), [f'run.dir="{tmp_path}"', 'checkpoint.resume="never"'])
    assert resume.find_resume(never) is None


def test_bad_resume_paths_and_other_models_exit_2(tmp_path, capsys):
    from meshtrain.job import resolve_job

    (tmp_path / "step_00000003").mkdir()  # a save killed before meta.json
    for path in (tmp_path / "missing", tmp_path / "step_00000003"):
        code = main(
            [
                "run",
                CONFIG,
                "--set",
                f'checkpoint.resume="{path}"',
                "--set",
                f'run.dir="{tmp_path / "run"}"',
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "checkpoint.resume" in err[0] and str(path) in err[0]
    other = tmp_path / "other"
    other.mkdir()
    shape = dataclasses.asdict(resolve_job(load_config(Path(CONFIG))).shape)
    (other / "meta.json").write_text(
        json.dumps({"family": "llama", "shape": {**shape, "hidden_size": 32}})
    )
    job = resolve_job(load_config(Path(CONFIG), [f'checkpoint.resume="{other}"']))
    with pytest.raises(UserError, match=r"checkpoint.resume: .*hidden_size 32 vs 64"):
        resume.check_resume(job)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lr_schedule_resumes_into_any_number_of_parameter_groups():
    """The optimizer's lr is not in the schedule's state_dict, and layouts differ in how many
    parameter groups they have: resume sets every group to the lr of the saved step."""
    from meshtrain.optim import build_lr_schedule

    train = load_config(Path(CONFIG)).train  # warmup_steps = 2: the lr still changes at step 3
    first = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=train.lr)
    schedule = build_lr_schedule(first, train)
    for _ in range(3):
        first.step()
        schedule.step()
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    other = torch.optim.AdamW([{"params": [p]} for p in params], lr=train.lr)
    resumed = build_lr_schedule(other, train)
    checkpoint.restore_lr_schedule(resumed, 3)
    assert [g["lr"] for g in other.param_groups] == [first.param_groups[0]["lr"]] * 3
    assert resumed.get_last_lr()[0] == schedule.get_last_lr()[0] and resumed.last_epoch == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_reader_never_unpickles_arbitrary_objects(tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "ckpt"
    dcp.save({"model": {"w": torch.arange(6.0).view(2, 3)}}, checkpoint_id=ckpt, no_dist=True)
    target = {"model": {"w": torch.zeros(2, 3)}}
    dcp.load(target, storage_reader=checkpoint.SafeReader(ckpt), no_dist=True)
    assert torch.equal(target["model"]["w"], torch.arange(6.0).view(2, 3))
    with pytest.raises(UserError, match=r"does not fit this model .*model\.v"):
        checkpoint.load_tensors({"model": {"v": torch.zeros(1)}}, ckpt, "export", no_dist=True)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|os)\.system"):
        checkpoint.load_tensors(target, ckpt, "export", no_dist=True)
    assert not (Path.cwd() / "pwned").exists()


# -- a worker killed mid-run: the elastic launcher restarts the job, which resumes ------------

RESTART = [
    "parallel.pp=2",
    "train.micro_batch_size=2",
    "train.grad_acc=2",
    "train.steps=6",
    "checkpoint.keep=2",
    'checkpoint.resume="auto"',
]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _logged_steps(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


@pytest.mark.dist
@pytest.mark.e2e
def test_killed_worker_restarts_and_matches_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "killed"
    sets = [*RESTART, "checkpoint.every=1", "run.max_restarts=1", f'run.dir="{run_dir}"']
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshtrain",
            "run",
            CONFIG,
            *[a for s in sets for a in ("--set", s)],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(m["step"] >= 2 for m in _logged_steps(run_dir / "metrics.jsonl")):
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step 2 within 240 s"
            time.sleep(0.02)
        victims = worker_pids(run_dir)
        assert sorted(victims) == [0, 1], victims
        os.kill(victims[1], signal.SIGKILL)
        assert launcher.wait(timeout=240) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            for pid in worker_pids(run_dir).values():
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
        log.close()
    logged = _logged_steps(run_dir / "metrics.jsonl")
    assert sum(m["steps_this_run"] == 1 for m in logged) == 2, "the job did not restart"
    last = {m["step"]: m for m in logged}  # a resumed attempt rewrites the later steps
    (reference,) = run_world(
        2,
        [(CONFIG, [*RESTART, "checkpoint.every=0", f'run.dir="{tmp_path / "reference"}"'])],
        tmp_path,
    )
    assert sorted(last) == [m["step"] for m in reference] == list(range(1, 7))
    for want in reference:
        got = last[want["step"]]
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), want["step"]

"""Multinode tier (`make multinode`, not in the default run: a few minutes): two `torchrun` agents
on this machine act as two nodes of 4 workers each (c10d rendezvous on 127.0.0.1), each node with
its own MESHTRAIN_CACHE, training configs/tiny_cpu.toml at dp2 pp2 tp2 into one shared run dir.

    two nodes      the losses of one `meshtrain run` on 8 local workers; each node prepared
                   its own data once, into the same tokens
    a lost node    node 1's agent and workers killed mid-run: node 0 ends within 60 s and names
                   the lost ranks; both started again, the run resumes from its checkpoint and
                   finishes with the uninterrupted losses
    slurm          a one-host Slurm cluster (tests/slurm/cluster.sh, root: it installs
                   slurm-wlm and munge with apt when missing): configs/slurm.sbatch submitted
                   with sbatch, and srun with one task per worker, give the same losses
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode]

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.toml"
STEPS = 12
LAYOUT = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", f"train.steps={STEPS}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(run_dir: Path, *extra: str) -> list[str]:
    args = []
    for item in [*LAYOUT, f'run.dir="{run_dir}"', *extra]:
        args += ["--set", item]
    return args


def start_node(node: int, port: int, cache: Path, run_dir: Path, log: Path, *extra: str):
    """One torchrun agent with 4 workers, in a process group of its own (a whole "node")."""
    env = {**os.environ, "MESHTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=meshtrain-test",
        f"--node-rank={node}",
        "-m",
        "meshtrain",
        "run",
        str(TINY),
        *settings(run_dir, *extra),
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_node(pid: int) -> None:
    """SIGKILL the agent and every process below it (torchrun starts its workers in sessions
    of their own, so killing its process group would leave them running)."""
    tree, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", ",".join(map(str, frontier))],
            capture_output=True,
            text=True,
        ).stdout
        frontier = [int(p) for p in out.split()]
        tree += frontier
    for each in tree:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (a resumed run's later lines win)."""
    found = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        found[entry["step"]] = entry["loss"]
    return found


def tokens_digest(cache: Path) -> dict[str, str]:
    return {
        p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cache.glob("tokens/*/tokens.bin"))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The same run from one `meshtrain run` (its own launcher, 8 local workers)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "meshtrain", "run", str(TINY), *settings(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run_dir)


def test_two_nodes_give_the_single_launcher_losses(reference, tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    nodes = [
        start_node(n, port, tmp_path / f"cache{n}", run_dir, tmp_path / f"node{n}.log")
        for n in (0, 1)
    ]
    codes = [node.wait(timeout=600) for node in nodes]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    for log in logs:  # each node prepared its own cache once: one tokenizer, one corpus
        assert len(re.findall(r"data: trained a \d+-token BPE", log)) == 1, log[-2000:]
        assert len(re.findall(r"data: \d+ documents -> \d+ tokens", log)) == 2  # train + held out
    digests = [tokens_digest(tmp_path / f"cache{n}") for n in (0, 1)]
    assert digests[0] == digests[1] and len(digests[0]) == 2
    assert_workers_on_chosen_malloc(run_dir)


def assert_workers_on_chosen_malloc(run_dir: Path) -> None:
    """Workers torchrun or srun started restarted themselves on run.malloc "auto"'s choice."""
    from meshtrain.malloc import find_tcmalloc

    expected = "malloc libtcmalloc" if find_tcmalloc() else "malloc system)"
    for rank in range(8):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert expected in text, (rank, text[:2000])


def test_a_lost_node_is_named_and_a_restart_resumes(reference, tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    extra = ["checkpoint.every=2", 'checkpoint.resume="auto"']
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    node0 = start_node(0, port, tmp_path / "cache0", run_dir, logs[0], *extra)
    time.sleep(2)  # node 0 joins first and gets ranks 0-3 (it also hosts the store)
    node1 = start_node(1, port, tmp_path / "cache1", run_dir, logs[1], *extra)
    deadline = time.monotonic() + 400
    while not (run_dir / "checkpoints" / "step_00000004").is_dir():  # then kill in step 5
        assert time.monotonic() < deadline and node0.poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.5)
    kill_node(node1.pid)  # the whole node: agent and workers
    killed_at = time.monotonic()
    code = node0.wait(timeout=120)
    assert time.monotonic() - killed_at < 60 and code != 0
    text = logs[0].read_text()
    assert "ranks 4-7 stopped without an error" in text, text[-4000:]
    node1.wait()

    port = free_port()
    nodes = [
        start_node(n, port, tmp_path / f"cache{n}", run_dir, tmp_path / f"again{n}.log", *extra)
        for n in (0, 1)
    ]
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], (tmp_path / "again0.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "again0.log").read_text()
    got = losses(run_dir)
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-host Slurm cluster (tests/slurm/cluster.sh: installs slurm-wlm and munge with apt
    if missing, so it needs root); its clients' environment."""
    folder = tmp_path_factory.mktemp("slurm")
    script = ROOT / "tests" / "slurm" / "cluster.sh"
    result = subprocess.run(
        [str(script), "start", str(folder)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    yield folder, env
    subprocess.run([str(script), "stop", str(folder)], check=False)


def test_sbatch_script_and_srun_give_the_single_launcher_losses(reference, slurm, tmp_path):
    """configs/slurm.sbatch as a user submits it (one node of 8 workers here: the one host),
    and plain srun with one task per worker."""
    folder, env = slurm
    env = {**env, "MESHTRAIN_CACHE": str(tmp_path / "cache")}
    batch = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--nodes=1",
            f"--output={tmp_path / 'job.out'}",
            "configs/slurm.sbatch",
            *settings(tmp_path / "sbatch"),
        ],
        cwd=ROOT,
        env={**env, "CONFIG": "configs/tiny_cpu.toml", "NPROC_PER_NODE": "8"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert batch.returncode == 0, batch.stderr + (tmp_path / "job.out").read_text()[-3000:]
    tasks = subprocess.run(
        [
            "srun",
            "--ntasks=8",
            "--cpus-per-task=1",
            sys.executable,
            "-m",
            "meshtrain",
            "run",
            str(TINY),
            *settings(tmp_path / "srun"),
        ],
        cwd=ROOT,
        env={
            **env,
            "MASTER_ADDR": socket.gethostname().split(".")[0],
            "MASTER_PORT": str(free_port()),
        },
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert tasks.returncode == 0, tasks.stderr[-3000:]
    assert_workers_on_chosen_malloc(tmp_path / "srun")
    assert "Traceback" not in tasks.stderr and "timed out" not in tasks.stderr
    for run in ("sbatch", "srun"):
        got = losses(tmp_path / run)
        for step, loss in reference.items():
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), (run, step, got[step], loss)

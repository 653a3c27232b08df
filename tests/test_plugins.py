"""The plugin manager: catalogs, duplicates, unknown names, disable, third-party entry points.

python -m pytest -q tests/test_plugins.py
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshtrain import hookimpl
from meshtrain.config import load_config
from meshtrain.errors import ConfigError, UserError
from meshtrain.job import resolve_job
from meshtrain.plugins import Plugins

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ("meshtrain_models", "meshtrain_schedules", "meshtrain_data")


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """A data source without keys."""


class FakeSource:
    config_class = NoOptions

    def prepare(self, options, ctx):
        pass

    def open(self, options, ctx):
        raise NotImplementedError


class FakeSchedule:
    stages_per_rank = 1
    splits_backward = False

    def placement(self, pp_rank, pp):
        return [pp_rank]

    def validate(self, *, pp, grad_acc, num_layers):
        return []

    def in_flight(self, pp_rank, pp, grad_acc):
        return grad_acc

    def build(self, stages, n_microbatches, loss_fn):
        raise NotImplementedError


def make_plugin(name: str, *, schedules=(), sources=()):
    """A plugin object registered directly (as `Plugins(extra=[...])` does in tests)."""

    class Plugin:
        __name__ = name

        @hookimpl
        def pipeline_schedules(self):
            return {s: FakeSchedule() for s in schedules}

        @hookimpl
        def data_sources(self):
            return {s: FakeSource() for s in sources}

    return Plugin()


def tiny_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"base = {json.dumps(str(ROOT / 'configs' / 'tiny_cpu.toml'))}\n{text}")
    return path


def test_builtins_register_through_entry_points():
    plugins = Plugins()
    names = {info.name for info in plugins.describe()}
    assert set(BUILTINS) <= names
    assert {"gpipe", "1f1b"} <= set(plugins.catalogs["pipeline_schedules"])
    assert "llama" in plugins.catalogs["model_families"]
    models = next(info for info in plugins.describe() if info.name == "meshtrain_models")
    assert models.distribution == "meshtrain" and models.hooks == ["model_families"]
    assert models.provides == {
        "model_families": [
            "gemma",
            "gpt_neox",
            "llama",
            "mistral",
            "mixtral",
            "olmo2",
            "phi3",
            "qwen2",
            "qwen3",
            "qwen3_moe",
        ]
    }


def test_extra_plugin_provides_names():
    plugins = Plugins(extra=[make_plugin("extra", schedules=["zigzag"], sources=["mine"])])
    assert plugins.get("pipeline_schedules", "zigzag", "k").stages_per_rank == 1
    info = next(info for info in plugins.describe() if info.name == "extra")
    assert info.distribution == "(registered directly)"
    assert info.provides == {"pipeline_schedules": ["zigzag"], "data_sources": ["mine"]}


def test_duplicate_name_names_both_plugins():
    with pytest.raises(UserError) as info:
        Plugins(
            extra=[
                make_plugin("first", schedules=["same"]),
                make_plugin("second", schedules=["same"]),
            ]
        )
    (line,) = info.value.problems
    assert "'same' is provided twice" in line
    assert "plugin first" in line and "plugin second" in line


def test_duplicate_of_a_builtin_names_the_builtin():
    with pytest.raises(UserError) as info:
        Plugins(extra=[make_plugin("mine", schedules=["1f1b"])])
    assert "meshtrain_schedules" in str(info.value) and "plugin mine" in str(info.value)


def test_unknown_name_suggests_and_lists():
    plugins = Plugins()
    with pytest.raises(UserError) as info:
        plugins.get("pipeline_schedules", "1fb1", "run.toml: pipeline.schedule")
    (line,) = info.value.problems
    assert line.startswith("run.toml: pipeline.schedule: unknown pipeline schedule '1fb1'")
    assert "(did you mean 1f1b?)" in line and "available: 1f1b, dualpipev, gpipe" in line


def test_disable_removes_a_plugin():
    plugins = Plugins(disable=["meshtrain_schedules"])
    assert "meshtrain_schedules" not in {info.name for info in plugins.describe()}
    with pytest.raises(UserError) as info:
        plugins.get("pipeline_schedules", "1f1b", "k")
    assert "available: none installed" in str(info.value)


def test_disable_in_config_makes_schedule_unknown(tmp_path):
    path = tiny_config(
        tmp_path, '[plugins]\ndisable = ["meshtrain_schedules"]\n[data]\nsource = "testdata"\n'
    )
    extra = [make_plugin("testplugin", sources=["testdata"])]
    with pytest.raises(ConfigError) as info:
        resolve_job(load_config(path), extra)
    assert info.value.problems == [
        f"{path}: pipeline.schedule: unknown pipeline schedule '1f1b'; available: none installed"
    ]


def test_disable_unknown_plugin_suggests(tmp_path):
    path = tiny_config(
        tmp_path, '[plugins]\ndisable = ["meshtrain_schedule"]\n[data]\nsource = "testdata"\n'
    )
    with pytest.raises(ConfigError) as info:
        resolve_job(load_config(path), [make_plugin("testplugin", sources=["testdata"])])
    assert (
        f"{path}: plugins.disable: no plugin 'meshtrain_schedule' "
        "(did you mean meshtrain_schedules?)"
    ) in info.value.problems


def test_core_never_imports_a_plugin_package():
    for source in sorted((ROOT / "meshtrain").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in BUILTINS]
            assert not bad, f"{source.name}:{node.lineno} imports {bad}"


def _imports(source: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, function-level ones too, except those under
    `if TYPE_CHECKING:` (never executed)."""
    tree = ast.parse(source.read_text(), str(source))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def test_builtin_plugins_import_only_the_public_api():
    for source in sorted((ROOT / "plugins").rglob("*.py")):
        for line, module in _imports(source):
            if module == "meshtrain" or module.startswith("meshtrain."):
                assert module == "meshtrain.api", f"{source.relative_to(ROOT)}:{line} {module}"


def test_core_modules_have_no_import_circle():
    graph = {}
    for source in sorted((ROOT / "meshtrain").glob("*.py")):
        name = f"meshtrain.{source.stem}"
        graph[name] = {m for _, m in _imports(source) if m.startswith("meshtrain.")} - {name}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_core_modules_load_no_plugin_until_plugins_load():
    code = textwrap.dedent("""
        import sys
        import meshtrain, meshtrain.cli, meshtrain.config, meshtrain.contracts, meshtrain.errors
        import meshtrain.hookspecs, meshtrain.hub, meshtrain.job, meshtrain.layout
        import meshtrain.pipeline, meshtrain.plugins
        plugin = lambda: sorted(m for m in sys.modules if m.startswith("meshtrain_"))
        print(plugin())
        meshtrain.plugins.Plugins()
        print(plugin())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert set(BUILTINS) <= set(ast.literal_eval(out[1]))  # the probe does see plugins


THIRD_PARTY = '''
"""A third-party meshtrain plugin, as a package on PyPI would ship it."""
from dataclasses import dataclass

from meshtrain import hookimpl


@dataclass(frozen=True, kw_only=True)
class Options:
    repeat: int = 1


class Source:
    config_class = Options

    def prepare(self, options, ctx):
        pass

    def open(self, options, ctx):
        raise NotImplementedError


class Schedule:
    stages_per_rank = 1
    splits_backward = False

    def placement(self, pp_rank, pp):
        return [pp_rank]

    def validate(self, *, pp, grad_acc, num_layers):
        return []

    def in_flight(self, pp_rank, pp, grad_acc):
        return grad_acc

    def build(self, stages, n_microbatches, loss_fn):
        raise NotImplementedError


@hookimpl
def data_sources():
    return {"mythird_data": Source()}


@hookimpl
def pipeline_schedules():
    return {"mythird_sched": Schedule()}
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> Path:
    """A folder holding an 'installed' distribution mythird 0.1 with one entry-point line."""
    site = tmp_path_factory.mktemp("site")
    (site / "mythird_plugin.py").write_text(THIRD_PARTY)
    info = site / "mythird-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mythird\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[meshtrain]\nmythird = mythird_plugin\n")
    return site


def run_cli(args: list[str], site: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p)
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=ROOT,
    )


def test_third_party_distribution_is_listed(third_party):
    result = run_cli(["plugins"], third_party)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index("mythird  (mythird 0.1)")
    block = "\n".join(lines[at : at + 4])
    assert "hooks: data_sources, pipeline_schedules" in block
    assert "data source: mythird_data" in block and "pipeline schedule: mythird_sched" in block
    assert all(name in result.stdout for name in BUILTINS)


def test_third_party_names_can_be_selected(third_party, tmp_path):
    path = tiny_config(
        tmp_path,
        '[parallel]\npp = 2\n[pipeline]\nschedule = "mythird_sched"\n'
        '[data]\nsource = "mythird_data"\nrepeat = 3\n',
    )
    result = run_cli(["check", str(path)], third_party)
    assert result.returncode == 0, result.stderr
    assert 'schedule = "mythird_sched"' in result.stdout and "repeat = 3" in result.stdout
    bad = run_cli(["check", str(path), "--set", "data.repeat=true"], third_party)
    assert bad.returncode == 2
    assert bad.stderr == f"error: {path}: data.repeat: expected an integer, got True\n"


@pytest.mark.dist
def test_third_party_family_trains_at_pp2_tp2_like_one_process(tmp_path, monkeypatch):
    """A model family written in plain torch against `meshtrain.api` alone, installed as a
    dist-info outside the repository with a schedule of its own, trains at pp2 tp2 under that
    schedule (activation checkpointing, vocab-parallel embedding) with the single-process
    losses."""
    from tests.spawn import run_world

    site = tmp_path / "site"
    site.mkdir()
    (site / "tinymlp_family.py").write_text(
        (ROOT / "tests/thirdparty/tinymlp_family.py").read_text()
    )
    info = site / "tinymlp-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinymlp\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[meshtrain]\ntinymlp = tinymlp_family\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[model]\nfamily = "tinymlp"\nhidden = 32\nwidth = 64\nlayers = 4\n\n'
        "[train]\nsteps = 4\ngrad_acc = 2\nmicro_batch_size = 2\nseq_len = 32\nlr = 1e-2\n"
        'activation_checkpointing = "full"\n\n[checkpoint]\nresume = "never"\n'
    )
    runs = {1: [], 4: ["parallel.pp=2", "parallel.tp=2", 'pipeline.schedule="tinymlp_1f1b"']}
    losses = {
        world: [
            m["loss"]
            for m in run_world(
                world, [(str(config), [*extra, f'run.dir="{tmp_path / str(world)}"'])], tmp_path
            )[0]
        ]
        for world, extra in runs.items()
    }
    assert losses[1][-1] < losses[1][0]
    for one, four in zip(losses[1], losses[4], strict=True):
        assert abs(one - four) <= 1e-5 * abs(one), losses

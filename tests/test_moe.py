"""Mixtures of experts (meshtrain_models qwen3_moe, mixtral; meshtrain.experts) against
transformers and against one process.

Without a process group: the MoE block as meshtrain runs it gives transformers' output; the aux
loss of one sequence and one layer is transformers' `load_balancing_loss_func`; the init is
transformers'; bad parallel.ep degrees are one line naming the keys; `check` counts experts / ep.

Spawned worlds (tiny random models that transformers saved, `pretrained = true`, 5 steps at lr
1e-3 on synthetic tokens, global batch 4 x 32 tokens), the aux loss on (coef 0.05) unless "noaux":

    world 1   each family in one process, aux on and off: the references
    world 2   each family at dp2 ep2 (replicated dp), aux on and off (Mixtral's aux off only
              under `make parity`); Qwen3-MoE's step-4 checkpoint resumed at dp1 tp2
    world 4   Qwen3-MoE at dp2 ep2 tp2 with sequence parallel and at dp4 ep2 with FSDP2 (two
              groups of ep ranks); Mixtral at dp2 ep2 pp2
    world 8   each family at dp2 pp2 tp2 ep2 (1F1B, FSDP2), aux on: step 1 is transformers' loss
              on the same batch, the step-4 checkpoint exported and read by `from_pretrained`
              gives meshtrain's step-5 loss; Qwen3-MoE also aux off
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from meshtrain.cli import main
from tests.hf_reference import (
    GLOBAL_BATCH,
    SEQ_LEN,
    VOCAB,
    global_batches,
    hf_logits_and_loss,
    write_config,
)
from tests.spawn import WIDE, run_world

RTOL = 1e-5
STEPS = 5
AUX = ["model.output_router_logits=true", "model.router_aux_loss_coef=0.05"]
NOAUX = ["model.output_router_logits=false"]
SHARED = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
FAMILIES = {
    # 8 experts of width 32; layer 1 a dense MLP (mlp_only_layers), split over tp like LLaMA's.
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 8,
        "moe_intermediate_size": 32,
        "intermediate_size": 128,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,
    },
    # 4 experts in every layer; checkpoints name them block_sparse_moe.experts.<e>.w1/w2/w3.
    "mixtral": {"num_local_experts": 4, "intermediate_size": 32},
}


def model_class(family: str) -> type:
    import transformers

    return {
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
    }[family]


def tiny_config(family: str, **overrides):
    config = model_class(family).config_class(**{**SHARED, **FAMILIES[family], **overrides})
    config._attn_implementation = "sdpa"
    return config


def random_model(family: str, **overrides) -> torch.nn.Module:
    """Norms random too; the router's weights large enough that routing is decisive."""
    torch.manual_seed(1)
    model = model_class(family)(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.eval()


def family_of(name: str):
    from meshtrain_models import model_families

    return model_families()[name]


# ---------------------------------------------------------------- without a process group


@pytest.fixture
def mesh():
    """A world of one, in this process."""
    from meshtrain.config import load_config
    from meshtrain.mesh import close_mesh, init_mesh

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"
    yield init_mesh(load_config(path), "cpu")
    close_mesh()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_blocks_as_meshtrain_runs_them_give_transformers_logits(family, mesh):
    """The whole model with every MoE block run by meshtrain's ExpertParallel (ep 1, tp 1)
    gives transformers' logits; the plan names exactly the MoE layers (not Qwen3-MoE's dense
    layer 1)."""
    from meshtrain.expert_stats import uncounted

    reference = random_model(family)
    impl = family_of(family)
    model = impl.build(tiny_config(family))
    model.load_state_dict(reference.state_dict())
    stage = impl.split(model, range(4), first=True, last=True, sequence_shards=1)
    plan = impl.plan(stage, sequence_parallel=False)
    moe_layers = [i for i in range(4) if f"model.layers.{i}.mlp" in plan.experts]
    assert moe_layers == ([0, 2, 3] if family == "qwen3_moe" else [0, 1, 2, 3])
    for path, style in plan.experts.items():
        style.apply(stage.get_submodule(path), mesh.mesh["ep", "tp"], sequences=1)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN))
    with torch.no_grad(), uncounted():
        torch.testing.assert_close(stage.eval()(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_aux_loss_of_one_sequence_is_transformers(mesh):
    """Per sequence and layer, meshtrain's aux loss is transformers' load_balancing_loss_func
    of that sequence and layer alone; the run's is their mean."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from meshtrain.experts import ExpertParallel, _aux_loss

    style = ExpertParallel(num_experts=8, top_k=2, norm_topk_prob=True, layer=0, moe_layers=1)
    torch.manual_seed(0)
    logits = torch.randn(3 * SEQ_LEN, 8)  # three sequences, one after another
    probs = torch.softmax(logits, -1)
    chosen = probs.topk(2, -1).indices
    sequence = torch.arange(3 * SEQ_LEN) // SEQ_LEN
    got = _aux_loss(probs, chosen, sequence, 3, SEQ_LEN, style, mesh.mesh["tp"])
    want = sum(
        load_balancing_loss_func((logits[i * SEQ_LEN : (i + 1) * SEQ_LEN],), 8, 2) for i in range(3)
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_is_transformers_init(family):
    """Router and experts N(0, initializer_range), norms 1 (transformers' `_init_weights`)."""
    impl = family_of(family)
    config = tiny_config(family, initializer_range=0.05)
    torch.manual_seed(0)
    reference = model_class(family)(config)
    for name, want in reference.state_dict().items():
        got = impl.init_parameter(name, want.shape, config, torch.Generator().manual_seed(0))
        if want.unique().numel() == 1:
            assert torch.equal(got, want), name
        else:
            tolerance = 0.1 if want.numel() > 2000 else 0.3  # a router has 256 values
            assert math.isclose(float(got.std()), float(want.std()), rel_tol=tolerance), name
            assert math.isclose(float(want.std()), 0.05, rel_tol=tolerance), name


def moe_config(tmp_path: Path, family: str, folder: Path | None = None) -> Path:
    """A run config over `folder` (by default a fresh one holding only the tiny config)."""
    if folder is None:
        folder = tmp_path / f"{family}-hf"
        tiny_config(family).save_pretrained(folder)
    return write_config(tmp_path / f"{family}.toml", folder, STEPS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.dp=3", "parallel.ep=3"], "parallel.ep: 3 does not divide model.num_experts"),
        (["parallel.dp=2", "parallel.ep=4"], "parallel.ep: 4 does not divide parallel.dp (2)"),
        (["model.num_experts_per_tok=9"], "model.num_experts_per_tok: 9 exceeds the 8 experts"),
    ],
)
def test_bad_expert_degrees_are_one_line(tmp_path, capsys, overrides, message):
    config = moe_config(tmp_path, "qwen3_moe")
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["check", str(config), *sets]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line, line


def test_ep_on_a_dense_model_names_the_key(capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"
    assert main(["check", str(config), "--set", "parallel.dp=2", "--set", "parallel.ep=2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "parallel.ep: 2 but the model has no experts" in line, line


def test_check_counts_experts_over_ep(tmp_path):
    """Each rank stores num_experts / ep experts of every MoE block, everything else whole."""
    from meshtrain.config import load_config
    from meshtrain.job import resolve_job
    from meshtrain.layout import build_layout

    config = moe_config(tmp_path, "mixtral")
    job = resolve_job(load_config(config, ["parallel.dp=2", "parallel.ep=2"]))
    full = sum(p.numel() for p in random_model("mixtral").parameters())
    experts = sum(
        p.numel() for n, p in random_model("mixtral").named_parameters() if ".experts." in n
    )
    assert [row.params for row in build_layout(job)] == [full - experts // 2] * 2
    assert job.shape.num_experts == 4 and job.shape.moe_layers == 4


# ---------------------------------------------------------------- spawned worlds


def layout(dp=1, pp=1, tp=1, ep=1, sp=False, shard=False) -> list[str]:
    return [
        f"parallel.dp={dp}",
        f"parallel.pp={pp}",
        f"parallel.tp={tp}",
        f"parallel.ep={ep}",
        f"parallel.dp_shard={str(shard).lower()}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"train.micro_batch_size={GLOBAL_BATCH // (dp * 2)}",
    ]


RUNS = {  # (family, run) -> overrides; the world is dp * pp * tp
    **{(f, "one"): [*layout(), *AUX] for f in FAMILIES},
    **{(f, "one-noaux"): [*layout(), *NOAUX] for f in FAMILIES},
    **{(f, "dp2-ep2"): [*layout(dp=2, ep=2), *AUX, "checkpoint.every=2"] for f in FAMILIES},
    # Resumes the dp2-ep2 run from its step-4 checkpoint at dp1 tp2: experts from ep 2 to 1.
    ("qwen3_moe", "resume-tp2"): [
        *layout(tp=2),
        *AUX,
        'checkpoint.resume="{out}/qwen3_moe/dp2-ep2/checkpoints/step_00000004"',
    ],
    **{
        (f, "dp2-ep2-noaux"): [*layout(dp=2, ep=2), *NOAUX]
        for f in FAMILIES
        if WIDE or f == "qwen3_moe"
    },
    ("qwen3_moe", "dp2-ep2-tp2-sp"): [*layout(dp=2, ep=2, tp=2, sp=True), *AUX],
    ("mixtral", "dp2-ep2-pp2"): [*layout(dp=2, ep=2, pp=2), *AUX],
    # Two groups of ep ranks (edp 2): FSDP2 shards and averages the experts over edp.
    ("qwen3_moe", "dp4-ep2-shard"): [
        *layout(dp=4, ep=2, shard=True),
        *AUX,
        "train.grad_acc=1",
        "train.micro_batch_size=1",
    ],
    **{
        (f, "dp2-pp2-tp2-ep2"): [
            *layout(2, 2, 2, 2, shard=True),
            *AUX,
            "checkpoint.every=4",
            "checkpoint.keep=2",
        ]
        for f in FAMILIES
    },
    ("qwen3_moe", "dp2-pp2-tp2-ep2-noaux"): [*layout(2, 2, 2, 2, shard=True), *NOAUX],
}
CASES = [key for key in RUNS if not key[1].startswith(("one", "resume"))]


def world_of(overrides: list[str]) -> int:
    return math.prod(int(o.split("=")[1]) for o in overrides[:3])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(family, run) -> (per-step metrics, run dir, Hugging Face folder); one world per size."""
    out = tmp_path_factory.mktemp("moe")
    configs = {}
    for family in FAMILIES:
        folder = out / f"{family}-hf"
        random_model(family).save_pretrained(folder, max_shard_size="200KB")
        configs[family] = moe_config(out, family, folder)
    found = {}
    for world in sorted({world_of(o) for o in RUNS.values()}):
        keys = [k for k, o in RUNS.items() if world_of(o) == world]
        runs = [(str(configs[f]), overrides(RUNS[(f, r)], out / f / r, out)) for f, r in keys]
        for (f, r), history in zip(keys, run_world(world, runs, out), strict=True):
            found[(f, r)] = (history, out / f / r, out / f"{f}-hf")
    return found


def overrides(given: list[str], run_dir: Path, out: Path) -> list[str]:
    """`given` (paths under "{out}" made real) and the run's own run.dir."""
    return [*(o.replace("{out}", str(out)) for o in given), f'run.dir="{run_dir}"']


@pytest.mark.dist
def test_resume_in_another_layout_continues_exactly(worlds):
    """The dp2-ep2 run's step-4 checkpoint (experts split over ep) resumed at dp1 tp2 (every
    expert on each rank) gives the uninterrupted run's step 5."""
    (step,) = worlds[("qwen3_moe", "resume-tp2")][0]
    want = worlds[("qwen3_moe", "dp2-ep2")][0][4]
    assert step["step"] == 5
    for key in ("loss", "grad_norm", "aux_loss"):
        assert abs(step[key] - want[key]) <= RTOL * abs(want[key]), (key, step[key], want[key])


@pytest.mark.dist
@pytest.mark.parity
@pytest.mark.parametrize(("family", "run"), CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_layout_matches_one_process(worlds, family, run):
    """Loss, gradient norm and aux loss per step (the aux loss's gradient reaches the routers,
    so later losses depend on it too); the expert load counts exactly."""
    one = "one-noaux" if run.endswith("noaux") else "one"
    reference, got = worlds[(family, one)][0], worlds[(family, run)][0]
    assert len(got) == len(reference) == STEPS
    for ref, step in zip(reference, got, strict=True):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert abs(step[key] - ref[key]) <= RTOL * abs(ref[key]), (
                f"{family} {run} step {ref['step']}: {key} {step[key]} vs {ref[key]}"
            )
        assert step["expert_tokens_max"] == ref["expert_tokens_max"]
        slots = GLOBAL_BATCH * SEQ_LEN * SHARED["num_experts_per_tok"]
        assert step["expert_tokens_mean"] * reference_experts(family) == slots


def reference_experts(family: str) -> int:
    return FAMILIES[family].get("num_experts") or FAMILIES[family]["num_local_experts"]


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_aux_loss_changes_training(worlds, family):
    """The aux loss is on in the reference: its gradient changes the steps after the first."""
    aux, plain = worlds[(family, "one")][0], worlds[(family, "one-noaux")][0]
    assert aux[0]["loss"] == plain[0]["loss"]
    assert aux[0]["aux_loss"] > 0.9  # E * sum f P: about 1 when balanced
    assert abs(aux[-1]["loss"] - plain[-1]["loss"]) > 1e-6


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrained_first_step_is_transformers_loss(worlds, family):
    history, _, folder = worlds[(family, "dp2-pp2-tp2-ep2")]
    reference = model_class(family).from_pretrained(folder)
    reference.config.output_router_logits = False  # meshtrain's `loss` is the cross-entropy
    _, want = hf_logits_and_loss(reference, global_batches(1)[0])
    got = history[0]["loss"]
    assert abs(got - want) <= RTOL * want, f"{family}: meshtrain {got} vs transformers {want}"


@pytest.mark.dist
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_of_trained_model_gives_meshtrain_numbers(worlds, tmp_path, family):
    """The step-4 checkpoint (experts split over ep and FSDP2) exported in Hugging Face's
    per-expert layout: `from_pretrained` gives meshtrain's step-5 loss, and the logits of the
    packed model read from the checkpoint."""
    from transformers import AutoModelForCausalLM

    from meshtrain.export import export_checkpoint, load_full_model

    history, run_dir, _ = worlds[(family, "dp2-pp2-tp2-ep2")]
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    exported = export_checkpoint(checkpoint, tmp_path / "export", max_shard_size="200KB")
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model) is model_class(family)
    model.config.output_router_logits = False
    batch = global_batches(5)[4]
    logits, got = hf_logits_and_loss(model, batch)
    want = history[4]["loss"]
    assert abs(got - want) <= RTOL * want, f"exported {got} vs meshtrain step 5 {want}"
    _, packed = load_full_model(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(logits, packed(batch.inputs).logits, rtol=1e-5, atol=1e-6)

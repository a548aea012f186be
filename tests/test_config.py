"""Every recipe and config option composes into valid specs; a bad value fails at compose time,
naming its key, before any stage runs."""

import pytest

from pipeline.config.compose import CONF_DIR, RECIPES_DIR, compose_config
from pipeline.errors import PipelineError
from tests.conftest import assert_clear_error, run_cli

GROUP_OPTIONS = [
    (g.name, p.stem)
    for g in sorted(CONF_DIR.iterdir())
    if g.is_dir() and g.name != "accelerate"
    for p in sorted(g.glob("*.yaml"))
]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_composes_into_valid_specs(recipe):
    cfg, specs = compose_config([f"recipe={recipe}"])
    assert cfg.run.name == recipe
    assert specs.train.seq_len <= specs.model.max_seq_len and specs.train.batch_tokens % specs.train.seq_len == 0


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    _, specs = compose_config([f"{group}={option}"])
    assert getattr(specs, group) is not None


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.decay=cosin", "train.decay"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("finetune.train.time_budget=6", "finetune.train.time_budget"),
        ("data.max_docs=0", "data.max_docs"),
        ("prepare.shard_bytes=0", "prepare.shard_bytes"),
        ("train.batch_tokens=1000", "train.batch_tokens"),
        ("finetune.train.lr=-1", "finetune.train.lr"),
        ("finetune.lora.r=0", "finetune.lora.r"),
        ("finetune.method=qlora", "finetune.method"),
        ("finetune.data.format=csv", "finetune.data.format"),
        ("model.n_head=3", "model.d_model"),
        ("train.seq_len=2048", "model.max_seq_len"),
        ("generate.top_p=2", "generate.top_p"),
        ("generate.chat=maybe", "generate.chat"),
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("resume=sometimes", "resume"),
    ],
)
def test_a_bad_value_is_refused_at_compose_time_naming_its_key(override, key):
    with pytest.raises(PipelineError, match=key.replace(".", r"\.")):
        compose_config([override])


@pytest.mark.slow
def test_a_typo_in_a_late_stage_fails_before_the_first_stage_runs(tmp_path):
    proc = run_cli("stage=all", "run.name=typo", "train.decay=cosin", cwd=tmp_path, check=False)
    assert_clear_error(proc, "train.decay='cosin'", "cosine")
    assert not (tmp_path / "runs").exists()  # no tokenizer trained, no corpus read


def test_a_full_fine_tune_of_a_given_base_at_the_quickstart_lr_is_warned(caplog):
    _, specs = compose_config(["recipe=quickstart"])
    assert specs.finetune.method == "full" and specs.model.d_model == 128  # the chain's own small model
    assert not [r for r in caplog.records if "would overwrite" in r.getMessage()]
    compose_config(["recipe=quickstart", "finetune.base=/models/llama"])
    assert any("finetune.train.lr=2e-5 or a LoRA recipe" in r.getMessage() for r in caplog.records)
    caplog.clear()
    compose_config(["recipe=quickstart", "finetune.base=/models/llama", "finetune.train.lr=2e-5"])
    assert not caplog.records

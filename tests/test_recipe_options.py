"""Recipe options: train.optimizer=muon (Muon on the blocks' weight matrices, AdamW on the rest,
one optimizer to the loop, its state in checkpoints) and model.arch=qwen3 (QK-norm)."""

import numpy as np
import pytest
import torch

from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError
from pipeline.train.optim import MuonAndAdamW, hidden_matrices, make_optimizer
from tests.trainer_helpers import losses, make_trainer, tiny_model, weights


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = make_optimizer(model, TrainSpec(optimizer="muon"), fused=False)
    assert isinstance(opt, MuonAndAdamW)
    muon, adamw = ({id(p) for g in part.param_groups for p in g["params"]} for part in opt.parts)
    assert muon == {id(p) for p in hidden_matrices(model)} and not muon & adamw
    assert muon | adamw == {id(p) for p in model.parameters()}
    assert id(model.get_input_embeddings().weight) in adamw and id(model.get_output_embeddings().weight) in adamw
    assert all(p.dim() == 2 for p in hidden_matrices(model))
    assert len(opt.param_groups) == sum(len(part.param_groups) for part in opt.parts)
    with pytest.raises(PipelineError, match="not FSDP or DeepSpeed"):
        make_optimizer(model, TrainSpec(optimizer="muon"), fused=False, sharded=True)


def test_muon_trains_and_its_state_resumes_exactly(tmp_path):
    straight = make_trainer(tmp_path / "straight", optimizer="muon", decay="constant", max_steps=12)
    straight.fit()
    assert losses(straight)[-1] < losses(straight)[0]
    make_trainer(tmp_path / "run", optimizer="muon", decay="constant", max_steps=6).fit()
    resumed = make_trainer(tmp_path / "run", optimizer="muon", decay="constant", max_steps=12)
    assert resumed.fit()["start_step"] == 6
    np.testing.assert_allclose(losses(resumed), losses(straight), rtol=0, atol=1e-6)
    for k, v in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=0, atol=1e-6)


def test_qk_norm_arch_is_a_plain_auto_model_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.config.model import ModelSpec
    from pipeline.model.build import build_model, hf_config

    model = build_model(hf_config(ModelSpec(arch="qwen3", d_model=32, n_layer=2, n_head=4, d_ff=64), 64, 0, 1, 2), 0)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.model.layers[0].self_attn.q_norm is not None
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no remote code
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(PipelineError, match="model.arch='gpt'"):
        ModelSpec(arch="gpt")


def test_the_schedule_reaches_both_parts_after_prepare_and_resume(tmp_path):
    from pipeline.train.optim import lr_at

    straight = make_trainer(tmp_path / "straight", optimizer="muon", decay="wsd", max_steps=12, ckpt_every=6)
    straight.fit()
    parts = straight.optimizer.optimizer.parts  # through accelerate's wrapper
    expected = lr_at(11, straight.spec)
    assert expected < straight.spec.lr  # in the cooldown
    assert all(g["lr"] == expected for part in parts for g in part.param_groups)

    make_trainer(tmp_path / "run", optimizer="muon", decay="wsd", max_steps=12, ckpt_every=6, lr=3e-3).fit()
    (tmp_path / "run/checkpoints/step_000012").rename(tmp_path / "run/gone")  # resume where the cooldown begins
    resumed = make_trainer(tmp_path / "run", optimizer="muon", decay="wsd", max_steps=12, ckpt_every=6)
    assert resumed.fit()["start_step"] == 10
    for k, v in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[k], v, rtol=0, atol=1e-6)


def test_muon_is_refused_for_lora():
    from pipeline.config.model import LoraSpec
    from pipeline.model.lora import apply_lora

    with pytest.raises(PipelineError, match="LoRA adapters train with finetune.train.optimizer=adamw"):
        make_optimizer(apply_lora(tiny_model(), LoraSpec(r=2)), TrainSpec(optimizer="muon"), fused=False)


def test_zero_init_projections_make_every_block_start_as_the_identity():
    from pipeline.config.model import ModelSpec
    from pipeline.model.build import build_model, hf_config

    config = hf_config(ModelSpec(d_model=32, n_layer=2, n_head=4, d_ff=64), 64, 0, 1, 2)
    model = build_model(config, 0, zero_init_proj=True)
    zeroed = [n for n, p in model.named_parameters() if not p.any()]
    assert sorted(zeroed) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")
    )
    hidden = model.model(torch.tensor([[3, 4, 5]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], hidden[0])  # the first block passes the residual stream through

"""The chunked loss against the plain one (the reference): the same per-token losses and gradients
for every allow-listed architecture, through DDP, under PEFT's wrappers of the head and in the Trainer
(fp32, packed rows, untrained labels, a chunk size that does not divide the positions); only trained
positions projected on a CPU; the plain path where logits are modified after the head; and no
full-vocabulary logits kept for backward."""

import gc
from datetime import timedelta

import numpy as np
import pytest
import torch
import transformers

from pipeline.config.compose import compose_config
from pipeline.config.model import LoraSpec
from pipeline.config.train import TrainSpec, math_only
from pipeline.errors import PipelineError
from pipeline.model.lora import apply_lora
from pipeline.train.loss import (
    CHUNKABLE_MODEL_TYPES,
    IGNORE,
    auto_chunk_tokens,
    token_losses,
)
from tests.trainer_helpers import autograd_saved_bytes, losses, make_trainer

VOCAB, HIDDEN, CHUNK = 97, 32, 7  # 2 x 13 = 26 positions, 22 trained: chunks of 7, 7, 7 and 1
DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**DECODER, **kw),
    "mistral": lambda **kw: transformers.MistralConfig(**DECODER, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**DECODER, **kw),
    "qwen3": lambda **kw: transformers.Qwen3Config(**DECODER, head_dim=8, **kw),
    "phi3": lambda **kw: transformers.Phi3Config(**DECODER, **kw),
    "gpt2": lambda **kw: transformers.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **kw),
}


def tiny(model_type: str, vocab: int = VOCAB, **config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type](vocab_size=vocab, **config)).eval()


def packed_batch(vocab: int = VOCAB, rows: int = 2, seq: int = 13) -> dict:
    """Two documents per row (position ids restart at 5) and some untrained labels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :3] = IGNORE
    labels[1, 8] = IGNORE
    positions = torch.cat([torch.arange(5), torch.arange(seq - 5)]).expand(rows, seq)
    return {"input_ids": ids[:, :-1], "position_ids": positions, "labels": labels}


def losses_and_grads(model, batch: dict, chunk) -> tuple[torch.Tensor, dict, list[list[tuple]]]:
    """Per-token losses, the trainable parameters' gradients, and the shapes the output head saw in
    forward and then in backward (recomputing chunks)."""
    shapes = []
    head = getattr(model, "module", model).get_output_embeddings()  # DDP holds the model as .module
    hook = head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    model.zero_grad(set_to_none=True)
    per_token = token_losses(model, batch, chunk)
    forward = len(shapes)
    per_token.sum().backward()
    hook.remove()
    shapes = [shapes[:forward], shapes[forward:]]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return per_token.detach(), grads, shapes


def assert_chunked_equals_plain(model, batch: dict) -> None:
    plain, plain_grads, plain_shapes = losses_and_grads(model, batch, 0)
    chunked, chunked_grads, shapes = losses_and_grads(model, batch, CHUNK)
    assert plain_shapes == [[(2, 13, HIDDEN)], []]
    # Only the 22 trained of the 26 positions meet the head, in chunks of 7 (on a CPU: a GPU projects all 26).
    chunks = [(7, HIDDEN), (7, HIDDEN), (7, HIDDEN), (1, HIDDEN)]
    assert shapes[0] == [(2, 1, HIDDEN), *chunks]  # the chunked path ran: the model's own head call keeps one position
    assert sorted(shapes[1]) == sorted(chunks)  # and each chunk's logits were recomputed in backward, not kept
    assert (plain[batch["labels"] == IGNORE] == 0).all()
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", sorted(CHUNKABLE_MODEL_TYPES))
def test_chunked_losses_and_gradients_equal_the_plain_ones(model_type):
    # Equality also verifies that hidden_states[-1] is the head's input (after the final norm).
    assert_chunked_equals_plain(tiny(model_type), packed_batch())


@pytest.mark.timeout(120)  # a hung gloo group fails here, not at the suite's limit
@pytest.mark.parametrize("find_unused_parameters", [False, True])
def test_chunked_equals_plain_through_ddp(tmp_path, find_unused_parameters):
    # The forward goes through DDP's wrapper, the head is called outside it: the gradient hooks of a
    # one-process gloo group must see every parameter's gradient exactly once.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=120)
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny("llama"), find_unused_parameters=find_unused_parameters)
        assert_chunked_equals_plain(ddp, packed_batch())
        del ddp  # its reducer lets go of the group before the group is destroyed
        gc.collect()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "tied, head_targets, new_tokens, head_type",
    [
        (True, [], [3, 4], "TrainableTokensWrapper"),  # rows of added tokens trained in the tied embedding
        (False, [], [3, 4], "TrainableTokensWrapper"),  # ... and in the untied head
        (False, ["lm_head"], None, "Linear"),  # LoRA on the head (PEFT's lora.Linear)
    ],
)
def test_chunked_equals_plain_under_peft_wrappers_of_the_head(tied, head_targets, new_tokens, head_type):
    spec = LoraSpec(r=2, dropout=0.0, target_modules=["q_proj", "v_proj", *head_targets])
    model = apply_lora(tiny("llama", tie_word_embeddings=tied), spec, new_token_ids=new_tokens)
    with torch.no_grad():  # LoRA's B and the token deltas start at zero: make the adapters change the logits
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    head = model.get_output_embeddings()
    assert type(head).__name__ == head_type and type(head) is not torch.nn.Linear
    assert_chunked_equals_plain(model, packed_batch())


@pytest.mark.parametrize(
    "make",
    [
        lambda: transformers.AutoModelForCausalLM.from_config(
            transformers.Gemma2Config(**DECODER, head_dim=8, vocab_size=VOCAB, final_logit_softcapping=30.0)
        ),
        lambda: tiny("llama", logit_scale=0.5),  # an allow-listed type whose config names a logit modifier
    ],
)
def test_models_that_modify_their_logits_take_the_plain_path(make):
    model = make()
    plain, _, _ = losses_and_grads(model, packed_batch(), 0)
    asked_chunked, _, shapes = losses_and_grads(model, packed_batch(), CHUNK)
    assert shapes == [[(2, 13, HIDDEN)], []]
    torch.testing.assert_close(asked_chunked, plain, rtol=0, atol=0)


def test_the_chunked_path_keeps_no_full_vocabulary_logits_for_backward():
    vocab, rows, seq = 16384, 2, 32
    model = tiny("llama", vocab=vocab).train()
    batch = {"input_ids": torch.randint(0, vocab, (rows, seq)), "labels": torch.randint(0, vocab, (rows, seq))}
    logits_bytes = rows * seq * vocab * 4
    assert autograd_saved_bytes(model, lambda: token_losses(model, batch, 0)) > logits_bytes
    assert autograd_saved_bytes(model, lambda: token_losses(model, batch, 16)) < logits_bytes / 4


def test_auto_chunks_only_micro_batches_with_large_logits():
    assert auto_chunk_tokens(16 * 1024, 50257) == 1335  # gpt2 at 16 x 1024: 3.3 GB of fp32 logits
    assert auto_chunk_tokens(1335, 50257) == 0  # one chunk's worth: nothing recomputed
    assert auto_chunk_tokens(16 * 256, 64) == 0  # a small CPU model


def test_auto_projects_only_the_trained_positions_once_and_equals_the_plain_path():
    model, batch = tiny("llama"), packed_batch()
    plain, plain_grads, _ = losses_and_grads(model, batch, 0)
    auto, auto_grads, shapes = losses_and_grads(model, batch, "auto")
    assert shapes == [[(2, 1, HIDDEN), (22, HIDDEN)], []]  # one chunk of the trained positions, kept
    torch.testing.assert_close(auto, plain, rtol=0, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(auto_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_loss_chunk_tokens_is_checked_and_not_in_the_checkpoint_fingerprint():
    for bad in (-1, True, "big", 1.5):
        with pytest.raises(PipelineError, match=r"train\.loss_chunk_tokens"):
            TrainSpec(loss_chunk_tokens=bad)
    with pytest.raises(PipelineError, match=r"finetune\.train\.loss_chunk_tokens"):
        compose_config(["finetune.train.loss_chunk_tokens=-3"])
    assert compose_config(["train=gpu", "train.loss_chunk_tokens=2048"])[1].train.loss_chunk_tokens == 2048
    assert math_only(vars(TrainSpec(loss_chunk_tokens=0))) == math_only(vars(TrainSpec()))


def test_training_with_the_chunked_loss_gives_the_plain_losses(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=4, eval_every=2, ckpt_every=0, loss_chunk_tokens=0)
    plain_summary = plain.fit()
    chunked = make_trainer(tmp_path / "chunked", max_steps=4, eval_every=2, ckpt_every=0, loss_chunk_tokens=CHUNK)
    rows = []
    chunked.unwrapped_model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].dim()))
    chunked_summary = chunked.fit()
    assert 2 in rows  # the head saw chunks of flattened positions
    np.testing.assert_allclose(losses(chunked), losses(plain), rtol=1e-5)
    for when in ("initial", "final"):
        assert chunked_summary[when]["val_loss"] == pytest.approx(plain_summary[when]["val_loss"], rel=1e-5)

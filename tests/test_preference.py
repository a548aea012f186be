"""The preference stage's pieces: the DPO/IPO loss against formulas computed here, prompt masking,
batching (padded = packed = one by one), pair records, exact resume, and self-made pairs that
never hold an eval task."""

import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config.train import TrainSpec
from pipeline.data.chat import Example
from pipeline.data.jsonl import read_jsonl
from pipeline.data.pairs import PairSamples, RenderedPair, collate_pairs, eval_pair_batches, render_pairs, to_pair
from pipeline.errors import PipelineError, TrainingStopped
from pipeline.train.choices import prepare_launch
from pipeline.train.loop import Trainer, TrainingJob
from pipeline.train.loss import IGNORE
from pipeline.train.preference import PreferenceObjective
from tests.trainer_helpers import host_reads, reset_accelerate

VOCAB = 64


def lora_model(seed: int = 0):
    """A tiny Llama with a LoRA adapter whose weights are random (not B = 0): policy != reference."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen answer, rejected answer) token ids of different lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, VOCAB, rng.integers(2, 7)).tolist()
        out.append(
            (
                prompt,
                rng.integers(3, VOCAB, rng.integers(1, 9)).tolist(),
                rng.integers(3, VOCAB, rng.integers(1, 9)).tolist(),
            )
        )
    return out


def rendered(prompt, chosen, rejected) -> RenderedPair:
    def side(answer):
        ids = prompt + answer
        return Example(ids[:-1], [IGNORE] * (len(prompt) - 1) + answer)

    return RenderedPair(side(chosen), side(rejected), len(prompt))


def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), summed over the answer's tokens, one sequence alone."""
    ids = torch.tensor([prompt + answer])
    logps = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logps[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))


def test_dpo_and_ipo_losses_match_their_formulas():
    model = lora_model().eval()
    raw = synthetic_pairs(5)
    batch = collate_pairs([rendered(*p) for p in raw], list(range(5)), pad_id=0)
    beta, eps = 0.3, 0.1
    with torch.no_grad():
        pol = [(answer_logp(model, p, c), answer_logp(model, p, r)) for p, c, r in raw]
        with model.disable_adapter():
            ref = [(answer_logp(model, p, c), answer_logp(model, p, r)) for p, c, r in raw]

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    d = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(pol, ref)]
    expected_dpo = [-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x) for x in d]
    lens = [(len(c), len(r)) for _, c, r in raw]
    ipo_d = [(pc - rc) / lc - (pr - rr) / lr for (pc, pr), (rc, rr), (lc, lr) in zip(pol, ref, lens)]
    expected_ipo = [(x - 1 / (2 * beta)) ** 2 for x in ipo_d]
    expected_rpo = [x - 0.5 * pc / lc for x, (pc, _), (lc, _) in zip(expected_dpo, pol, lens)]
    with torch.no_grad():
        dpo, metrics = PreferenceObjective(beta, "sigmoid", eps)(model, batch)
        ipo, _ = PreferenceObjective(beta, "ipo")(model, batch)
        rpo, _ = PreferenceObjective(beta, "sigmoid", eps, sft_weight=0.5)(model, batch)
    np.testing.assert_allclose(dpo.numpy(), expected_dpo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ipo.numpy(), expected_ipo, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rpo.numpy(), expected_rpo, rtol=1e-5, atol=1e-6)
    chosen_reward = [beta * (pc - rc) for (pc, _), (rc, _) in zip(pol, ref)]
    np.testing.assert_allclose(metrics[:, 0].numpy(), chosen_reward, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics[:, 2].numpy(), [beta * x for x in d], rtol=1e-4, atol=1e-6)
    assert metrics[:, 3].tolist() == [float(x > 0) for x in d]


def test_padded_pairs_equal_pairs_one_by_one_and_packed():
    model = lora_model(1).eval()
    pairs = [rendered(*p) for p in synthetic_pairs(6, seed=2)]
    objective = PreferenceObjective(0.1)
    with torch.no_grad():
        padded, pm = objective(model, collate_pairs(pairs, list(range(6)), pad_id=0))
        packed, _ = objective(model, collate_pairs(pairs, list(range(6)), pad_id=0, pack_width=24))
        alone = torch.cat([objective(model, collate_pairs([p], [i], pad_id=0))[0] for i, p in enumerate(pairs)])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    rows = collate_pairs(pairs, list(range(6)), pad_id=0, pack_width=24)["input_ids"].shape[0]
    assert rows < 12  # sequences share rows


def test_prompt_tokens_are_masked_and_shared(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.model.tokenizer import end_of_turn
    from tests.test_finetune_generate import make_base

    tok = AutoTokenizer.from_pretrained(make_base(tmp_path / "base"))
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say the number 7"}]
    pair = to_pair({"prompt": prompt, "chosen": "the number is 7", "rejected": "no"})
    (r,), too_long = render_pairs(tok, [pair], 96, end_of_turn(tok))
    assert too_long == 0
    generation_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    head = tok(generation_prompt, add_special_tokens=False)["input_ids"]
    for ex, answer in ((r.chosen, "the number is 7"), (r.rejected, "no")):
        assert ex.input_ids[: len(head)] == head and r.prompt_tokens == len(head)
        assert all(label == IGNORE for label in ex.labels[: len(head) - 1])  # no prompt token is scored
        trained = tok.decode([t for t in ex.labels if t != IGNORE])
        assert trained.startswith(answer) and trained.endswith(end_of_turn(tok))
    kept, dropped = render_pairs(tok, [pair], len(head), end_of_turn(tok))
    assert (kept, dropped) == ([], 1)  # a prompt that alone fills seq_len is dropped and counted


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "q", "chosen": "a"}', "needs 'chosen' and 'rejected'"),
        ('{"prompt": "q", "chosen": "", "rejected": "b"}', "'chosen' is empty"),
        (
            '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
            '"rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}',
            "same turns",
        ),
        ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "must be the assistant's"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_pair_lines_are_refused_naming_file_and_line(tmp_path, line, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(PipelineError) as e:
        list(read_jsonl(path, to_pair, "fix it"))
    message = str(e.value)
    assert message.startswith(f"{path}:2: ") and reason in message and "\n" not in message


def test_pair_formats_of_trl_are_read():
    conv = [{"role": "user", "content": "q"}]
    explicit = to_pair({"prompt": "q", "chosen": "a", "rejected": "b"})
    messages = to_pair(
        {
            "prompt": conv,
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    )
    implicit = to_pair(
        {
            "chosen": [*conv, {"role": "assistant", "content": "a"}],
            "rejected": [*conv, {"role": "assistant", "content": "b"}],
        }
    )
    assert explicit == messages == implicit


def preference_trainer(out, **overrides) -> Trainer:
    reset_accelerate()
    spec = TrainSpec(
        **{
            "max_steps": 6,
            "batch_tokens": 64,
            "micro_batch_size": 2,
            "seq_len": 16,
            "lr": 1e-2,
            "warmup_steps": 1,
            "mixed_precision": "no",
            "log_every": 1,
            "eval_every": 3,
            "ckpt_every": 3,
            "compile": False,
            **overrides,
        }
    )
    pairs = [rendered(*p) for p in synthetic_pairs(24, seed=3)]
    samples = PairSamples(pairs[:20], 0, 0, pack_width=16)
    job = TrainingJob(
        lora_model(),
        spec,
        out,
        "test",
        samples.batch,
        lambda micro: eval_pair_batches(pairs[20:], 0, micro, 16),
        objective=PreferenceObjective(0.5),
    )
    return Trainer(job, prepare_launch(job))


def _rows(trainer):
    return [r for r in trainer.metrics.rows() if "loss" in r]


def _adapter(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items() if "lora" in k}


def test_training_raises_the_margin_and_resumes_exactly_after_sigterm(tmp_path):
    ref = preference_trainer(tmp_path / "ref")
    summary = ref.fit()
    rows = _rows(ref)
    assert len(rows) == 6 and all("reward_accuracy" in r and "chosen_reward" in r for r in rows)
    assert summary["final"]["val_reward_margin"] > summary["initial"]["val_reward_margin"]

    t = preference_trainer(tmp_path / "run")
    real_batch = t.job.train_batch

    def batch_then_signal(first, size):
        if first == 1 * t.layout.global_seqs:  # while step 2 loads its data: the run stops after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(first, size)

    t.job.train_batch = batch_then_signal
    with pytest.raises(TrainingStopped) as stopped:
        t.fit()
    assert stopped.value.step == 2
    saved = safe_open(str(stopped.value.checkpoint / "model.safetensors"), "pt").keys()
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert set(saved) == trained and all("lora_" in k for k in saved)  # the adapter, not the frozen base
    resumed = preference_trainer(tmp_path / "run")
    assert resumed.fit()["start_step"] == 2
    np.testing.assert_allclose([r["loss"] for r in _rows(resumed)], [r["loss"] for r in rows], rtol=0, atol=1e-6)
    for k, v in _adapter(ref).items():
        torch.testing.assert_close(v, _adapter(resumed)[k], rtol=0, atol=1e-6)


def test_self_made_pairs_never_hold_an_eval_task():
    from pipeline.config.compose import compose_config
    from pipeline.stages.pairs import candidate_tasks, eval_exclusions

    _, specs = compose_config(["preference.pairs.prompts=100000"])
    prompts, names = eval_exclusions(specs)
    tasks = candidate_tasks(specs)
    assert len(tasks) > 1000 and len(prompts) > 50 and len(names) > 50
    assert not {t.messages[0]["content"] for t, _ in tasks} & prompts
    assert not {t.name for t, _ in tasks} & names  # so no chosen solution is an eval function's


def test_the_chain_runs_preference_tuning_only_when_asked():
    from pipeline.config.compose import compose_config
    from pipeline.config.stages import chain
    from pipeline.stages import answer_quality, generate

    _, plain = compose_config([])
    _, dpo = compose_config(["recipe=quickstart_dpo"])
    assert "preference" not in chain(plain) and "pairs" not in chain(plain)
    assert chain(dpo).index("finetune") < chain(dpo).index("pairs") < chain(dpo).index("preference")
    assert chain(dpo).index("preference") < chain(dpo).index("generate")
    assert generate.upstream(plain) == answer_quality.upstream(plain) == ["finetune"]
    assert generate.upstream(dpo) == answer_quality.upstream(dpo) == ["preference"]


def test_a_preference_step_never_waits_for_the_device(tmp_path, monkeypatch):
    t = preference_trainer(tmp_path)
    reads = host_reads(monkeypatch)
    pending = [t.step(0), t.step(1)]
    assert reads == []
    back = t.read_back(pending, 2, None)
    assert math.isfinite(back.loss) and set(back.metrics) == set(PreferenceObjective.metrics)


def test_the_run_dir_resolves_to_preference_only_when_it_follows_the_current_finetune(tmp_path):
    from pipeline.artifacts import manifest_hash, write_json_atomic
    from pipeline.model.inference import resolve_model

    def stage(name, inputs):
        d = tmp_path / name
        (d / "merged").mkdir(parents=True, exist_ok=True)
        (d / "merged/config.json").write_text("{}")
        manifest = {"stage": name, "status": "complete", "config_hash": name, "inputs": inputs, "files": {}}
        write_json_atomic(d / "manifest.json", manifest)
        return manifest

    finetune = stage("finetune", {})
    stage("preference", {"finetune": {"path": str(tmp_path / "finetune"), "manifest_hash": manifest_hash(finetune)}})
    assert resolve_model(str(tmp_path)).model_dir == str(tmp_path / "preference/merged")
    stage("finetune", {"pretrain": {"manifest_hash": "rebuilt"}})  # a newer fine-tune: preference/ is stale
    assert resolve_model(str(tmp_path)).model_dir == str(tmp_path / "finetune/merged")


def test_an_adapter_on_a_base_rebuilt_since_is_refused_in_one_line(tmp_path):
    """base_model_name_or_path names a path: a rebuilt pretrain/ holds other weights there."""
    import json

    from pipeline.artifacts import manifest_hash, write_json_atomic
    from pipeline.model.inference import resolve_model

    pretrain = {"stage": "pretrain", "status": "complete", "config_hash": "a", "inputs": {}, "files": {}}
    (tmp_path / "pretrain/model").mkdir(parents=True)
    write_json_atomic(tmp_path / "pretrain/manifest.json", pretrain)
    (tmp_path / "finetune/adapter").mkdir(parents=True)
    base = str(tmp_path / "pretrain/model")
    (tmp_path / "finetune/adapter/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    inputs = {"pretrain": {"manifest_hash": manifest_hash(pretrain)}}
    write_json_atomic(
        tmp_path / "finetune/manifest.json", {"stage": "finetune", "status": "complete", "inputs": inputs}
    )
    for target in (tmp_path, tmp_path / "finetune/adapter"):
        assert resolve_model(str(target)).model_dir == base
    write_json_atomic(tmp_path / "pretrain/manifest.json", dict(pretrain, config_hash="b"))  # rebuilt since
    for target in (tmp_path, tmp_path / "finetune/adapter"):
        with pytest.raises(
            PipelineError, match="earlier build of .* retrain it: pipeline stage=finetune .* force=\\[finetune\\]"
        ):
            resolve_model(str(target))

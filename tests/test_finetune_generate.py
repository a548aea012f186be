"""Fine-tune any local HF model dir with LoRA through the CLI, then generate and chat from it."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe
from tests.conftest import (
    REPO,
    assert_clear_error,
    make_documents,
    manifest_facts,
    run_cli,
)

pytestmark = pytest.mark.slow

FT = [
    "finetune.train.max_steps=6",
    "finetune.train.seq_len=96",
    "finetune.train.batch_tokens=384",
    "finetune.train.micro_batch_size=2",
    "finetune.train.mixed_precision=no",
    "finetune.train.log_every=1",
    "finetune.train.ckpt_every=3",
    "finetune.train.lr=1e-2",
]


def make_base(path, with_template=True):
    tok = to_hf_tokenizer(train_bpe(make_documents(60), 400), 256)
    if not with_template:
        tok.chat_template = None
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = []
    for i in range(60):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"say the number {i}"},
                    {"role": "assistant", "content": f"the number is {i}"},
                ]
            }
        )
    rows.append({"instruction": "Add", "input": "2 and 3", "output": "5"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, chat_jsonl):
    root = tmp_path_factory.mktemp("ft")
    base = make_base(root / "base")
    run_cli(
        "stage=finetune",
        "run.name=ft",
        f"finetune.base={base}",
        "finetune.data.source=jsonl",
        f"finetune.data.paths=[{chat_jsonl}]",
        "finetune.data.val_fraction=0.2",
        *FT,
        cwd=root,
    )
    return root, base


def test_adapter_loads_and_merged_equals_base_plus_adapter(finetuned):
    from peft import PeftModel

    root, base = finetuned
    stage = root / "runs/ft/finetune"
    facts = json.loads((stage / "manifest.json").read_text())["facts"]
    assert facts["method"] == "lora" and facts["outputs"] == ["adapter", "merged"]
    assert facts["final_val_loss"] < facts["initial_val_loss"]
    assert "[[the number is" in facts["example_trained_span"]  # the rendered example with its trained span

    ids = torch.tensor([[5, 6, 7, 30, 31, 32, 33]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), stage / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(stage / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base)(ids).logits, merged(ids).logits)


def test_saved_chat_template_formats_prompts_like_training(finetuned):
    root, base = finetuned
    conv = [{"role": "user", "content": "say the number 3"}]
    trained = AutoTokenizer.from_pretrained(base).apply_chat_template(conv, add_generation_prompt=True)
    for d in ("adapter", "merged"):
        saved = AutoTokenizer.from_pretrained(root / "runs/ft/finetune" / d)
        assert saved.apply_chat_template(conv, add_generation_prompt=True) == trained


def test_base_without_chat_template_gets_ours_with_a_warning(tmp_path, chat_jsonl):
    base = make_base(tmp_path / "plain", with_template=False)
    run_cli(
        "stage=finetune",
        "run.name=p",
        f"finetune.base={base}",
        "finetune.data.source=jsonl",
        f"finetune.data.paths=[{chat_jsonl}]",
        "finetune.data.val_fraction=0.2",
        "finetune.merge=false",
        *FT,
        cwd=tmp_path,
    )
    assert manifest_facts(tmp_path / "runs/p/finetune")["chat_template"] == "pipeline"
    saved = AutoTokenizer.from_pretrained(tmp_path / "runs/p/finetune/adapter")
    assert "<|assistant|>" in saved.chat_template
    assert not (tmp_path / "runs/p/finetune/merged").exists()


def test_generate_stage_greedy_equals_model_generate(finetuned, tmp_path):
    root, _ = finetuned
    prompts = tmp_path / "p.txt"
    prompts.write_text("say the number 7\n\nsay the number 12\n")
    run_cli(
        "stage=generate",
        "run.name=ft",
        f"generate.model={root / 'runs/ft'}",
        f"generate.prompts={prompts}",
        "generate.temperature=0",
        "generate.max_new_tokens=8",
        "generate.batch_size=2",
        "generate.dtype=fp32",  # compared below with the plain fp32 model: no timing race picks the weights
        cwd=tmp_path,
    )
    rows = [json.loads(x) for x in (tmp_path / "runs/ft/generate/samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["say the number 7", "say the number 12"]

    merged = root / "runs/ft/finetune/merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    for r in rows:
        text = tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=8, eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id
        )[0, enc["input_ids"].shape[1] :].tolist()
        n = next((k for k, t in enumerate(out) if t in stops), len(out))
        assert r["completion"] == tok.decode(out[:n], skip_special_tokens=True)
        assert r["completion_tokens"] == n


def test_generate_prompt_formats_and_seeded_sampling(finetuned, tmp_path):
    root, _ = finetuned
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "say the number 1"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "say the number 2"}]})
        + "\n"
    )
    completions = []
    for name in ("a", "b"):
        run_cli(
            "stage=generate",
            f"run.name={name}",
            f"generate.model={root / 'runs/ft'}",
            f"generate.prompts={jsonl}",
            "generate.temperature=1.0",
            "generate.seed=3",
            "generate.max_new_tokens=12",
            cwd=tmp_path,
        )
        rows = [json.loads(x) for x in (tmp_path / f"runs/{name}/generate/samples.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and isinstance(rows[1]["prompt"], list)
        completions.append([r["completion"] for r in rows])
    assert completions[0] == completions[1]


@pytest.mark.parametrize(
    "setup, needles",
    [
        (lambda p: "generate.prompts=" + str(p / "missing.txt"), ["missing.txt does not exist"]),
        (
            lambda p: (p / "empty.txt").write_text("\n") and "generate.prompts=" + str(p / "empty.txt"),
            ["has no prompts"],
        ),
    ],
)
def test_generate_bad_prompt_files(finetuned, tmp_path, setup, needles):
    root, _ = finetuned
    proc = run_cli(
        "stage=generate", "run.name=x", f"generate.model={root / 'runs/ft'}", setup(tmp_path), cwd=tmp_path, check=False
    )
    assert_clear_error(proc, *needles)


def test_run_without_a_model_names_the_stage_to_run(tmp_path):
    (tmp_path / "runs/empty").mkdir(parents=True)
    proc = run_cli(
        "stage=generate", "run.name=x", f"generate.model={tmp_path / 'runs/empty'}", cwd=tmp_path, check=False
    )
    assert_clear_error(proc, "no finished model yet", "stage=pretrain")


def test_chat_script_answers_piped_messages(finetuned):
    root, _ = finetuned
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/chat.py"),
            str(root / "runs/ft"),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        input="say the number 4\n/reset\nsay the number 5\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chat mode" in proc.stderr and proc.stderr.count("tokens/s]") == 2
    assert "[conversation cleared]" in proc.stderr
    assert len([line for line in proc.stdout.splitlines()]) >= 2


def test_full_finetune_writes_a_plain_model(tmp_path, chat_jsonl):
    base = make_base(tmp_path / "base")
    run_cli(
        "stage=finetune",
        "run.name=full",
        f"finetune.base={base}",
        "finetune.method=full",
        "finetune.data.source=jsonl",
        f"finetune.data.paths=[{chat_jsonl}]",
        "finetune.data.val_fraction=0.2",
        "finetune.packing=true",
        *FT,
        "finetune.train.lr=1e-3",
        cwd=tmp_path,
    )
    stage = tmp_path / "runs/full/finetune"
    facts = json.loads((stage / "manifest.json").read_text())["facts"]
    assert facts["outputs"] == ["merged"] and facts["packed_rows"] > 0
    assert facts["trainable_params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    assert facts["final_val_loss"] < facts["initial_val_loss"]


def test_tensorboard_and_offline_wandb_trackers(tmp_path, chat_jsonl):
    base = make_base(tmp_path / "base")
    common = [
        "stage=finetune",
        f"finetune.base={base}",
        "finetune.data.source=jsonl",
        f"finetune.data.paths=[{chat_jsonl}]",
        "finetune.data.val_fraction=0.2",
        "finetune.merge=false",
        *FT,
    ]
    run_cli(*common, "run.name=tb", "logger=tensorboard", cwd=tmp_path)
    assert list((tmp_path / "runs/tb/finetune").rglob("events.out.tfevents.*"))
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path)}
    run_cli(*common, "run.name=wb", "logger=wandb", cwd=tmp_path, env={k: v for k, v in env.items() if k == "HOME"})
    assert list((tmp_path / "runs/wb").rglob("offline-run-*")), "wandb should log offline under the run dir"

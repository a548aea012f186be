"""Bad input through the real CLI: exit != 0, one line naming the input and the fix, no traceback.
(Documented skips instead of errors are asserted too: binary files, non-UTF-8 bytes.)"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import TINY, assert_clear_error, make_documents, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "ok"}\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "chat_bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    (tmp_path / "tiny").mkdir()
    for i in range(40):
        (tmp_path / "tiny" / f"{i}.txt").write_text(f"w{i}")
    return tmp_path


TINY_TRAIN = ["model=tiny", "train=tiny", *TINY]
CASES = {
    "missing path": (["stage=prepare", "data=text", "data.paths=[nope/]"], ["'nope/' matches no file"]),
    "empty folder": (["stage=prepare", "data=text", "data.paths=[empty/]"], ["empty/ has no files"]),
    "empty file": (["stage=prepare", "data=text", "data.paths=[empty.txt]"], ["contains no text"]),
    "JSONL line not JSON": (["stage=prepare", "data=jsonl", "data.paths=[bad.jsonl]"], ["bad.jsonl:2: not valid JSON"]),
    "JSONL text field absent": (
        ["stage=prepare", "data=jsonl", "data.paths=[nofield.jsonl]"],
        ["nofield.jsonl:1: no 'text' field", "data.text_field"],
    ),
    "malformed Parquet": (
        ["stage=prepare", "data=parquet", "data.paths=[broken.parquet]"],
        ["broken.parquet is not a readable Parquet file"],
    ),
    "corpus smaller than a window": (
        [
            "stage=pretrain",
            "data=text",
            "data.paths=[tiny/]",
            "data.val_fraction=0.5",
            *TINY_TRAIN,
            "train.seq_len=256",
            "train.batch_tokens=2048",
            "model.max_seq_len=256",
        ],
        ["fewer than one window", "train.seq_len=256"],
    ),
    "unknown key": (["stage=prepare", "tokenizer.vocab_sise=100"], ["tokenizer.vocab_sise", "no such config key"]),
    "unknown group option": (["stage=prepare", "model=huge"], ["config error", "model/huge"]),
    "unknown recipe": (["recipe=nope"], ["no recipe named 'nope'"]),
    "unknown stage": (["stage=train"], ["stage=train is unknown"]),
    "negative lr": (
        ["stage=pretrain", "data=text", "data.paths=[tiny/]", *TINY_TRAIN, "train.lr=-1"],
        ["train.lr=-1.0 must be positive"],
    ),
    "zero batch": (
        ["stage=pretrain", "data=text", "data.paths=[tiny/]", *TINY_TRAIN, "train.micro_batch_size=0"],
        ["train.micro_batch_size=0 must be a positive"],
    ),
    "wrong value type": (["stage=prepare", "data.val_fraction=lots"], ["config error", "val_fraction"]),
    "chat with no assistant turn": (
        ["stage=finetune", "finetune.base=base", "finetune.data.source=jsonl", "finetune.data.paths=[chat_bad.jsonl]"],
        ["chat_bad.jsonl:1: the conversation has no assistant turn", "skip_bad"],
    ),
    "missing base model": (["stage=finetune", "finetune.base=./no_such_model"], ["no_such_model does not exist"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(bad_files, name):
    args, needles = CASES[name]
    if "finetune.base=base" in args:
        make_model(bad_files / "base", vocab=400)
    proc = run_cli(*args, "run.name=bad", cwd=bad_files, check=False)
    assert_clear_error(proc, *needles)
    manifests = list((bad_files / "runs").rglob("manifest.json")) if (bad_files / "runs").exists() else []
    # whatever stage failed left no manifest a later stage could trust
    failed_stage = args[0].split("=")[1]
    assert not any(
        m.parent.name in (failed_stage, "data" if failed_stage == "prepare" else failed_stage) for m in manifests
    ), manifests


def make_model(path, vocab, tokenizer_vocab=None):
    from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe

    tok = to_hf_tokenizer(train_bpe(make_documents(60), tokenizer_vocab or vocab), 256)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_tokenizer_larger_than_model_vocabulary_is_refused(tmp_path):
    make_model(tmp_path / "m", vocab=300, tokenizer_vocab=400)
    proc = run_cli("stage=finetune", "run.name=v", "finetune.base=m", cwd=tmp_path, check=False)
    assert_clear_error(proc, "has 400 tokens but the model only 300 embeddings")


def test_finetune_seq_len_beyond_model_positions_is_refused(tmp_path):
    make_model(tmp_path / "m", vocab=400)
    proc = run_cli(
        "stage=finetune",
        "run.name=v",
        "finetune.base=m",
        "finetune.train.seq_len=512",
        "finetune.train.batch_tokens=8192",
        cwd=tmp_path,
        check=False,
    )
    assert_clear_error(proc, "seq_len=512 exceeds the model's 256 positions")


def test_pickle_only_weights_are_refused(tmp_path):
    make_model(tmp_path / "m", vocab=400)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m/model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m/pytorch_model.bin")  # pickle weights only
    proc = run_cli("stage=finetune", "run.name=v", "finetune.base=m", cwd=tmp_path, check=False)
    assert_clear_error(proc, "could not load a causal LM from m", "safetensors")


def test_adapter_on_a_different_base_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    make_model(tmp_path / "a", vocab=400)
    other = LlamaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    make_model(tmp_path / "b", vocab=400)
    LlamaForCausalLM(other).save_pretrained(tmp_path / "b")
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(tmp_path / "a"), LoraConfig(target_modules="all-linear")
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    proc = run_cli(
        "stage=generate",
        "run.name=g",
        f"generate.model={tmp_path / 'b'}",
        f"generate.adapter={tmp_path / 'adapter'}",
        cwd=tmp_path,
        check=False,
    )
    assert_clear_error(proc, "was trained on", "not on")


def test_binary_and_non_utf8_files_are_skipped_or_repaired_and_counted(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(60)):
        (corpus / f"{i}.txt").write_text(doc)
    (corpus / "image.txt").write_bytes(b"\x89PNG\x00\x00\x00binary")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    run_cli("stage=prepare", "run.name=b", "data=text", f"data.paths=[{corpus}]", *TINY, cwd=tmp_path)
    facts = json.loads((tmp_path / "runs/b/tokenizer/manifest.json").read_text())["facts"]
    assert facts["binary_skipped"] == 1 and facts["non_utf8_replaced"] == 1


def test_unreadable_file_names_the_file(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.config.data import CorpusSpec
    from pipeline.data.sources import iter_documents
    from pipeline.errors import PipelineError

    (tmp_path / "locked.txt").write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # as root, chmod 000 does not stop reads
    with pytest.raises(PipelineError, match=r"locked.txt cannot be read \(Permission denied\)"):
        list(iter_documents(CorpusSpec(source="text", paths=[str(tmp_path)])))

"""The command-line contract, run as a user would run it (subprocess, real config)."""

import json

import pytest

from tests.conftest import TINY, assert_clear_error, last_actions, run_cli

pytestmark = pytest.mark.slow


def text_args(corpus, *extra):
    return ["stage=prepare", "run.name=t", "data=text", f"data.paths=[{corpus}]", *TINY, *extra]


def manifest(run, stage_dir):
    return json.loads((run / stage_dir / "manifest.json").read_text())


def test_prepare_builds_tokenizer_and_data_then_skips_then_forces(tmp_path, text_corpus):
    run_cli(*text_args(text_corpus), cwd=tmp_path)
    run = tmp_path / "runs" / "t"
    tok, data = manifest(run, "tokenizer"), manifest(run, "data")
    assert tok["status"] == data["status"] == "complete"
    assert tok["facts"]["vocab_size"] == 320 and tok["facts"]["val_bytes_per_token"] > 1
    assert data["facts"]["train"]["tokens"] > 10_000 and data["facts"]["val"]["docs"] > 0
    assert data["inputs"]["tokenizer"]["manifest_hash"]
    assert (run / ".hydra" / "config.yaml").exists()

    assert last_actions(run, 2) == {"tokenizer": "built (missing)", "prepare": "built (missing)"}

    run_cli(*text_args(text_corpus), cwd=tmp_path)
    assert last_actions(run, 2) == {"tokenizer": "reused", "prepare": "reused"}
    assert manifest(run, "data")["created"] == data["created"]

    run_cli(*text_args(text_corpus, "force=true"), cwd=tmp_path)
    assert last_actions(run, 2) == {"tokenizer": "built (forced)", "prepare": "built (forced)"}

    run_cli(*text_args(text_corpus, "force=[prepare]"), cwd=tmp_path)
    assert last_actions(run, 2) == {"tokenizer": "reused", "prepare": "built (forced)"}

    run_cli(*text_args(text_corpus, "tokenizer.vocab_size=300"), cwd=tmp_path)
    assert last_actions(run, 2) == {"tokenizer": "built (stale)", "prepare": "built (stale)"}
    assert manifest(run, "data")["facts"]["vocab_size"] == 300


def test_one_text_file_just_works_and_separators_take_escapes(tmp_path, text_corpus):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(p.read_text() for p in sorted(text_corpus.glob("*.txt"))))
    run_cli("stage=prepare", "run.name=book", "data=text", f"data.paths=[{book}]", *TINY, cwd=tmp_path)
    facts = manifest(tmp_path / "runs" / "book", "data")["facts"]
    assert facts["train"]["docs"] == facts["val"]["docs"] == 1 and facts["val"]["tokens"] > 0
    run_cli(
        "stage=prepare",
        "run.name=cut",
        "data=text",
        f"data.paths=[{book}]",
        "data.separator='\\n\\n'",
        *TINY,
        cwd=tmp_path,
    )
    assert manifest(tmp_path / "runs" / "cut", "data")["facts"]["train"]["docs"] > 100


def test_jsonl_source_end_to_end(tmp_path, jsonl_corpus):
    run_cli("stage=prepare", "run.name=j", "data=jsonl", f"data.paths=[{jsonl_corpus}]", *TINY, cwd=tmp_path)
    assert manifest(tmp_path / "runs" / "j", "data")["facts"]["train"]["docs"] > 80


def test_corrupt_tokenizer_is_refused(tmp_path, text_corpus):
    run_cli(*text_args(text_corpus), cwd=tmp_path)
    tok_json = tmp_path / "runs" / "t" / "tokenizer" / "tokenizer.json"
    tok_json.write_text(tok_json.read_text()[:100])
    proc = run_cli(*text_args(text_corpus), cwd=tmp_path, check=False)
    assert_clear_error(proc, "tokenizer is corrupt", "tokenizer.json", "force=true")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["data=text", "data.paths=[missing_dir/]"], ["missing_dir", "matches no file"]),
        (["data=text", "data.paths=[empty/]"], ["empty", "has no files"]),
        (["data=text", "data.paths=[empty.txt]"], ["contains no text"]),
        (["data=jsonl", "data.paths=[bad.jsonl]"], ["bad.jsonl:2", "not valid JSON"]),
        (["data=text"], ["data.paths is empty"]),
        (["tokenizer.vocab_sise=100"], ["tokenizer.vocab_sise", "no such config key"]),
        (["data=csv"], ["config error", "data/csv"]),
        (["recipe=nope"], ["no recipe named 'nope'"]),
        (["stage=train"], ["stage=train is unknown"]),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    proc = run_cli("stage=prepare", "run.name=bad", *args, cwd=tmp_path, check=False)
    assert_clear_error(proc, *needles)


def test_help_and_cfg(tmp_path):
    assert "stage" in run_cli("--help", cwd=tmp_path).stdout
    cfg = run_cli("--cfg", "tokenizer.vocab_size=999", cwd=tmp_path).stdout
    assert "vocab_size: 999" in cfg and "name: standard" in cfg and "execute: false" in cfg


def test_user_recipe_file(tmp_path, text_corpus):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        f"defaults:\n  - config\n  - override data: text\n  - _self_\n"
        f"run:\n  name: mine\ndata:\n  paths: [{text_corpus}]\ntokenizer:\n  vocab_size: 310\n"
    )
    out = run_cli(f"recipe={recipe}", "--cfg", cwd=tmp_path).stdout
    assert "name: mine" in out and "vocab_size: 310" in out and "source: text" in out

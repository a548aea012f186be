"""The prepare stage: one pass over (split, document) pairs gives each split exactly the tokens of
encoding its documents alone, with EOS after each, in corpus order, across chunks; the chunks do
not depend on how many processes share them; a killed prepare keeps its finished chunks."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config.data import CorpusSpec
from pipeline.data.encode import Chunks, encode_chunks, encode_documents, pieces
from pipeline.data.shards import collect, open_split
from pipeline.data.sources import iter_documents, labelled_documents, take_bytes
from pipeline.model.tokenizer import EOS, train_bpe
from tests.conftest import (
    TINY,
    assert_clear_error,
    launch_two_processes,
    make_documents,
    manifest_facts,
    run_cli,
)


def test_chunks_cut_the_stream_the_same_way_for_every_rank():
    labelled = [(i % 5 == 0, d, True) for i, d in enumerate(make_documents(60))]  # ~40 KB

    def chunk_docs(world, rank):
        chunks = Chunks(iter(labelled), 4000, 1500, lambda c: c % world == rank)
        return {(c, doc) for c, batch in chunks for _, doc, _ in batch}, chunks.count

    alone, count = chunk_docs(1, 0)
    assert count > 5 and {c for c, _ in alone} == set(range(count))
    shares = [chunk_docs(3, r) for r in range(3)]
    assert set().union(*(s for s, _ in shares)) == alone and all(n == count for _, n in shares)
    assert all(c % 3 == r for r, (s, _) in enumerate(shares) for c, _ in s)


def test_the_stream_hash_of_whole_documents_is_that_of_earlier_prepares():
    """A prepare killed before this version resumes: the hash of a chunk of whole documents is
    still b"T" or b"V", the document's UTF-8, then a NUL byte, per document."""
    import hashlib

    labelled = [(False, "caf\u00e9", True), (True, "two", True), (False, "thr", False), (False, "ee", True)]
    expected = hashlib.sha1(b"Tcaf\xc3\xa9\x00Vtwo\x00Tthree\x00").hexdigest()
    chunks = Chunks(iter(labelled), 2**20, 2**20, lambda c: True)
    list(chunks)
    assert chunks.ends == {0: expected}


def test_one_pass_writes_both_splits_with_the_tokens_of_each_document(tmp_path):
    docs = make_documents(50)
    tok = train_bpe(docs, 300)
    eos, dtype = tok.token_to_id(EOS), np.dtype(np.uint16)
    labelled = [(i % 4 == 0, d, True) for i, d in enumerate(docs)]
    chunks = Chunks(iter(labelled), 6000, 2000, lambda c: True)  # an iterator: it can be read once only
    assert encode_chunks(tok, chunks, tmp_path, dtype, eos, "fp") == list(range(chunks.count)) and chunks.count > 1
    splits, totals = collect(tmp_path, chunks.count, "fp")
    (tmp_path / "index.json").write_text(json.dumps({"dtype": "uint16", "splits": splits}))
    for split, is_val in (("train", False), ("val", True)):
        expected = [
            t for v, d, _ in labelled if v == is_val for t in tok.encode(d, add_special_tokens=False).ids + [eos]
        ]
        got = np.concatenate(open_split(tmp_path, split).arrays)
        assert got.tolist() == expected
        assert totals[split]["docs"] == sum(v == is_val for v, _, _ in labelled) and totals[split]["tokens"] == len(got)
    assert not list(tmp_path.glob("*.partial"))


def test_a_long_document_encoded_in_pieces_gives_the_tokens_of_the_whole():
    doc = "".join(take_bytes(iter_documents(CorpusSpec()), 1_500_000))  # real text: code, prose, unicode
    doc += "\u00e9t\u00e9 \u4e2d\u6587\n  \n\t x\n" * 50 + "x" * 30_000  # non-ASCII, whitespace runs, no line break
    tok = train_bpe([doc[i : i + 5000] for i in range(0, len(doc), 5000)], 2000)
    cut = pieces(doc, 10_000)
    assert len(cut) > 100 and "".join(cut) == doc
    whole = tok.encode(doc, add_special_tokens=False).ids
    parts = encode_documents(tok.encode_batch_fast, [doc], np.dtype(np.uint16), 10_000)[0]
    assert len(parts) == len(cut) and np.concatenate(parts).tolist() == whole
    crlf = doc[:300_000].replace("\n", "\r\n")  # Windows line ends are cut too
    parts = encode_documents(tok.encode_batch_fast, [crlf], np.dtype(np.uint16), 10_000)[0]
    assert len(parts) > 20 and np.concatenate(parts).tolist() == tok.encode(crlf, add_special_tokens=False).ids


def test_a_long_document_is_prepared_across_chunks_with_the_tokens_of_its_two_parts(tmp_path, monkeypatch):
    import pipeline.data.sources as sources

    text = "".join(take_bytes(iter_documents(CorpusSpec()), 300_000))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/book.txt").write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(sources, "LONG_DOCUMENT_BYTES", 100_000)
    monkeypatch.setattr(sources, "READ_BLOCK", 10_000)
    spec = CorpusSpec(source="text", paths=[str(tmp_path / "corpus")], val_fraction=0.2)
    tok = train_bpe([text[i : i + 5000] for i in range(0, len(text), 5000)], 500)
    eos = tok.token_to_id(EOS)
    chunks = Chunks(labelled_documents(spec), 40_000, 8_000, lambda c: True)
    out = tmp_path / "data"
    out.mkdir()
    encode_chunks(tok, chunks, out, np.dtype(np.uint16), eos, "fp")
    splits, totals = collect(out, chunks.count, "fp")
    (out / "index.json").write_text(json.dumps({"dtype": "uint16", "splits": splits}))
    assert chunks.count > 5 and totals["train"]["docs"] == totals["val"]["docs"] == 1
    train, val = ("".join(t for v, t, _ in labelled_documents(spec) if v == want) for want in (False, True))
    for split, part in (("train", train), ("val", val)):
        expected = tok.encode(part, add_special_tokens=False).ids + [eos]  # as if encoded whole
        assert np.concatenate(open_split(out, split).arrays).tolist() == expected


def shard_bytes(data_dir):
    index = json.loads((data_dir / "index.json").read_text())
    return index["splits"], {
        s["file"]: (data_dir / s["file"]).read_bytes() for p in index["splits"].values() for s in p
    }


KILL_IN_CHUNK = """
import os, signal, sys
from pipeline.data.shards import ChunkWriter
real = ChunkWriter.seal
def seal_then_die(self, stream_hash):
    if self.chunk == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # chunks 0-2 are sealed, chunk 3 is half-written
    return real(self, stream_hash)
ChunkWriter.seal = seal_then_die
from pipeline.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_prepare_resumes_at_the_chunk_it_was_writing(tmp_path, text_corpus):
    args = ["stage=prepare", "data=text", f"data.paths=[{text_corpus}]", *TINY, "prepare.shard_bytes=10000"]
    run_cli(*args, "run.name=a", cwd=tmp_path)
    ref = shard_bytes(tmp_path / "runs/a/data")
    assert manifest_facts(tmp_path / "runs/a/data")["chunks"] > 6

    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHUNK, *args, "run.name=b"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    data = tmp_path / "runs/b/data"
    assert (data / "train_00003.bin.partial").exists() and not (data / "manifest.json").exists()

    first = text_corpus / "doc_000.txt"  # in chunk 0, which the killed run finished
    original = first.read_text()
    first.write_text(original + "an edit\n")
    proc = run_cli(*args, "run.name=b", cwd=tmp_path, check=False)
    assert_clear_error(proc, "the corpus changed", "force=[prepare]")
    first.write_text(original)

    run_cli(*args, "run.name=b", cwd=tmp_path)
    assert manifest_facts(data)["chunks_kept"] == 3
    assert shard_bytes(data) == ref and not list(data.glob("*.partial"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_each_tokenize_their_chunks_into_the_same_shards(tmp_path, text_corpus):
    args = ["stage=prepare", "data=text", f"data.paths=[{text_corpus}]", *TINY, "prepare.shard_bytes=10000"]
    run_cli(*args, "run.name=one", cwd=tmp_path)
    launch_two_processes(*args, "run.name=two", cwd=tmp_path)
    one, two = tmp_path / "runs/one/data", tmp_path / "runs/two/data"
    assert shard_bytes(two) == shard_bytes(one)  # same tokens, same split, same order
    facts = manifest_facts(two)
    assert facts["processes"] == 2 and facts["chunks"] > 6
    assert facts["chunks_by_rank"] == [(facts["chunks"] + 1) // 2, facts["chunks"] // 2]  # rank r: chunks r, r+2, ...
    assert (
        json.loads((two / "manifest.json").read_text())["files"]
        == json.loads((one / "manifest.json").read_text())["files"]
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_prepare_a_file_larger_than_a_chunk_into_the_same_shards(tmp_path):
    """A single text file above data.long_document_bytes, without a separator: every rank reads
    it in segments and tokenizes only its chunks; the shards are those of one process."""
    text = "".join(take_bytes(iter_documents(CorpusSpec()), 1_000_000))
    book = tmp_path / "book.txt"
    book.write_text("".join(f"# copy {copy}\n{text}" for copy in range(3)))
    args = ["stage=prepare", "data=text", f"data.paths=[{book}]", "data.long_document_bytes=2000000"]
    args += ["tokenizer.vocab_size=320", "tokenizer.max_train_bytes=100000", "prepare.shard_bytes=300000"]
    run_cli(*args, "run.name=one", cwd=tmp_path)
    launch_two_processes(*args, "run.name=two", cwd=tmp_path)
    one, two = tmp_path / "runs/one/data", tmp_path / "runs/two/data"
    assert shard_bytes(two) == shard_bytes(one)
    facts = manifest_facts(two)
    assert facts["train"]["docs"] == facts["val"]["docs"] == 1 and facts["chunks"] >= 8
    assert facts["chunks_by_rank"] == [(facts["chunks"] + 1) // 2, facts["chunks"] // 2]
    assert facts["train"]["bytes"] + facts["val"]["bytes"] == book.stat().st_size
    assert 100_000 <= manifest_facts(tmp_path / "runs/one/tokenizer")["train_bytes"] < facts["train"]["bytes"]

import json

import pytest

from pipeline.data.sources import (
    CorpusSpec,
    is_val,
    iter_documents,
    labelled_documents,
    split_documents,
    stdlib_files,
    take_bytes,
)
from pipeline.errors import PipelineError


def test_split_is_deterministic_and_disjoint(text_corpus):
    spec = CorpusSpec(source="text", paths=[str(text_corpus)], val_fraction=0.2)
    train, val = list(split_documents(spec, "train")), list(split_documents(spec, "val"))
    assert len(train) + len(val) == 120 and 10 < len(val) < 40
    assert not set(train) & set(val)
    assert val == list(split_documents(spec, "val"))
    assert all(is_val(d, 0.2) for d in val)


def test_text_folder_glob_and_separator(tmp_path):
    (tmp_path / "a.txt").write_text("one<SEP>two<SEP> <SEP>three")
    (tmp_path / "skip.md").write_text("not taken")
    spec = CorpusSpec(source="text", paths=[str(tmp_path)], separator="<SEP>")
    assert list(iter_documents(spec)) == ["one", "two", "three"]


def test_jsonl_reads_text_field(jsonl_corpus):
    docs = list(iter_documents(CorpusSpec(source="jsonl", paths=[str(jsonl_corpus)])))
    assert len(docs) == 120 and docs[0].startswith("# doc 0")


def test_jsonl_bad_line_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(PipelineError, match=r"bad.jsonl:3: not valid JSON"):
        list(iter_documents(CorpusSpec(source="jsonl", paths=[str(path)])))


def test_jsonl_missing_field_names_the_fix(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PipelineError, match=r"x.jsonl:1: no 'text' field .*data.text_field"):
        list(iter_documents(CorpusSpec(source="jsonl", paths=[str(path)])))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha doc", "", "beta doc"]}), tmp_path / "d.parquet")
    spec = CorpusSpec(source="parquet", paths=[str(tmp_path)], text_field="content")
    assert list(iter_documents(spec)) == ["alpha doc", "beta doc"]
    with pytest.raises(PipelineError, match="no column 'text'"):
        list(iter_documents(CorpusSpec(source="parquet", paths=[str(tmp_path)])))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: str(p / "nope.txt"), "matches no file"),
        (lambda p: (p / "empty_dir").mkdir() or str(p / "empty_dir"), "has no files matching"),
        (lambda p: (p / "e.txt").write_text("") and str(p / "e.txt") or str(p / "e.txt"), "contains no text"),
    ],
)
def test_bad_paths_give_clear_errors(tmp_path, setup, message):
    with pytest.raises(PipelineError, match=message):
        list(iter_documents(CorpusSpec(source="text", paths=[setup(tmp_path)])))


def test_non_utf8_file_is_decoded_with_replacement(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert list(iter_documents(CorpusSpec(source="text", paths=[str(tmp_path)]))) == ["caf\ufffd"]


def test_stdlib_corpus_excludes_tests():
    files = stdlib_files()
    assert len(files) > 300
    assert not any("test" in p.parts[-2:-1] or "site-packages" in p.parts for p in files)


def test_unknown_source_is_refused():
    with pytest.raises(PipelineError, match="data.source='csv' is unknown"):
        CorpusSpec(source="csv")


def test_a_single_document_is_cut_into_train_and_its_last_val_fraction(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"line {i} of the only document\n" for i in range(1000)))
    spec = CorpusSpec(source="text", paths=[str(book)], val_fraction=0.1)
    train, val = list(split_documents(spec, "train")), list(split_documents(spec, "val"))
    assert len(train) == len(val) == 1 and train[0] + val[0] == book.read_text()
    assert val[0].startswith("line ") and 0.09 < len(val[0]) / len(book.read_text()) < 0.11  # at a line break


def test_separator_escapes_typed_on_the_command_line_are_understood():
    assert CorpusSpec(source="text", separator="\\n\\n").separator == "\n\n"
    assert CorpusSpec(source="text", separator="\\t|\\\\n").separator == "\t|\\n"
    assert CorpusSpec(source="text", separator="<|endoftext|>").separator == "<|endoftext|>"


def test_max_docs_and_max_bytes_stop_reading_early(jsonl_corpus):
    spec = CorpusSpec(source="jsonl", paths=[str(jsonl_corpus)], max_docs=7)
    assert len(list(iter_documents(spec))) == 7
    docs = list(iter_documents(CorpusSpec(source="jsonl", paths=[str(jsonl_corpus)], max_bytes=5000)))
    sizes = [len(d.encode()) for d in docs]
    assert sum(sizes[:-1]) < 5000 <= sum(sizes) and len(docs) < 120  # stops at the document that reaches it
    with pytest.raises(PipelineError, match="data.max_docs=0"):
        CorpusSpec(max_docs=0)


def test_a_separated_file_is_read_in_blocks_with_the_same_documents(tmp_path, monkeypatch):
    import pipeline.data.sources as sources

    docs = [f"d{i} caf\u00e9 \u4e2d\u6587 " * (i % 7 + 1) for i in range(200)]
    path = tmp_path / "big.txt"
    path.write_text("<SEP>".join(docs) + "<SEP>", encoding="utf-8")
    monkeypatch.setattr(sources, "READ_BLOCK", 7)  # multi-byte characters and separators straddle blocks
    assert list(sources.read_separated(path, "<SEP>")) == [*docs, ""]
    spec = CorpusSpec(source="text", paths=[str(path)], separator="<SEP>")
    assert list(iter_documents(spec)) == docs
    path.write_bytes(b"one<SEP>bad \xff byte<SEP>three")
    stats = {}
    assert list(sources.read_separated(path, "<SEP>", stats)) == ["one", "bad \ufffd byte", "three"]
    assert stats == {"non_utf8_replaced": 1}


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_reading_in_blocks_splits_exactly_like_the_whole_text(tmp_path, monkeypatch, block):
    import random

    import pipeline.data.sources as sources

    rng = random.Random(block)
    text = "".join(rng.choice(["a", "aa", "\r\n", "\n", "\n\n", "\ufffd", "\u00e9", "x"]) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(sources, "READ_BLOCK", block)
    for sep in ("\n\n", "aa", "\r\n\r\n", "a\ufffd"):
        stats = {}
        assert list(sources.read_separated(path, sep, stats)) == text.split(sep)
        assert stats == {}  # a real U+FFFD cut between blocks is not a decoding error


@pytest.fixture
def long_document(tmp_path, monkeypatch):
    """A 600 KB text file of real text, read as a long document in 20 KB blocks."""
    import pipeline.data.sources as sources

    text = "".join(take_bytes(iter_documents(CorpusSpec()), 600_000)) + "\u00e9t\u00e9 \u4e2d\u6587\r\n" * 3000
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(sources, "LONG_DOCUMENT_BYTES", 100_000)
    monkeypatch.setattr(sources, "READ_BLOCK", 20_000)
    return path, text


def test_a_long_document_is_read_in_segments_and_cut_into_train_and_val(long_document):
    path, text = long_document
    items = list(labelled_documents(CorpusSpec(source="text", paths=[str(path)], val_fraction=0.1)))
    train, val = ([t for v, t, _ in items if v == want] for want in (False, True))
    assert "".join(train) + "".join(val) == text  # every character once, in order
    assert len(train) > 20 and len(val) > 2 and max(len(t.encode()) for t in train + val) <= 40_000
    assert [ends for _, _, ends in items] == [*[False] * (len(train) - 1), True, *[False] * (len(val) - 1), True]
    cut = len("".join(train).encode())
    assert text.encode()[cut - 1 : cut] == b"\n" and 0.09 < 1 - cut / len(text.encode()) < 0.11


def test_a_long_document_keeps_its_bytes_across_blocks_and_repairs_bad_ones(tmp_path, monkeypatch):
    import pipeline.data.sources as sources

    monkeypatch.setattr(sources, "LONG_DOCUMENT_BYTES", 100)
    monkeypatch.setattr(sources, "READ_BLOCK", 7)  # multi-byte characters straddle blocks; no line break for a while
    path = tmp_path / "book.txt"
    good = "caf\u00e9 \u4e2d\u6587 " * 40 + "\n".join(f"line {i}" for i in range(100))
    path.write_bytes(good.encode() + b"\nbad \xff byte\n" + good.encode())
    stats = {}
    items = list(labelled_documents(CorpusSpec(source="text", paths=[str(path)]), stats))
    assert "".join(t for _, t, _ in items) == good + "\nbad \ufffd byte\n" + good
    assert stats == {"non_utf8_replaced": 1}


def test_the_tokenizer_budget_stops_inside_a_long_document(long_document):
    path, text = long_document
    taken = list(take_bytes(split_documents(CorpusSpec(source="text", paths=[str(path)]), "train"), 50_000))
    assert 50_000 <= sum(len(t.encode()) for t in taken) < 50_000 + 40_000 and text.startswith("".join(taken))


def test_a_long_document_without_line_breaks_is_cut_before_spaces_with_the_same_tokens(tmp_path, monkeypatch):
    import pipeline.data.sources as sources
    from pipeline.model.tokenizer import train_bpe

    words = "".join(take_bytes(iter_documents(CorpusSpec()), 40_000)).split()
    monkeypatch.setattr(sources, "LONG_DOCUMENT_BYTES", 100)
    monkeypatch.setattr(sources, "READ_BLOCK", 50)
    text = "\r".join(" ".join(words[i : i + 30]) + "  \t" for i in range(0, len(words), 30))  # old-Mac line ends
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    stats = {}
    items = list(labelled_documents(CorpusSpec(source="text", paths=[str(path)]), stats))
    assert len(items) > 100 and "".join(t for _, t, _ in items) == text and "hard_cuts" not in stats
    tok = train_bpe([text], 400)
    for want in (False, True):
        part = "".join(t for v, t, _ in items if v == want)
        segments = [i for t in (t for v, t, _ in items if v == want) for i in tok.encode(t).ids]
        assert segments == tok.encode(part).ids

    path.write_text("x" * 1000)  # nowhere to cut: cut anyway, and say so
    stats = {}
    items = list(labelled_documents(CorpusSpec(source="text", paths=[str(path)]), stats))
    assert "".join(t for _, t, _ in items) == "x" * 1000 and stats["hard_cuts"] > 0


def test_a_long_document_is_cut_into_val_at_a_character_without_a_line_break_near(tmp_path, monkeypatch):
    import pipeline.data.sources as sources

    monkeypatch.setattr(sources, "LONG_DOCUMENT_BYTES", 100)
    monkeypatch.setattr(sources, "VAL_CUT_WINDOW", 10)
    path = tmp_path / "book.txt"
    for text in ("\u4e2d" * 3001, "\U0001f600" * 2500 + "ab"):  # 3- and 4-byte characters
        path.write_text(text, encoding="utf-8")
        items = list(labelled_documents(CorpusSpec(source="text", paths=[str(path)], val_fraction=0.1)))
        train, val = ("".join(t for v, t, _ in items if v == want) for want in (False, True))
        assert train + val == text and 0.08 < len(val) / len(text) < 0.12

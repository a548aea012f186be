"""Where documents come from: the embedded stdlib corpus, text/JSONL/Parquet files, or a hub dataset.

Every source yields plain `str` documents in a deterministic order. The train/val split is a
hash of the document's text, so it does not depend on file order, seeds or the source type. A text
file read whole that is larger than data.long_document_bytes is never held in memory: it is a
`LongDocument`, read in segments cut where byte-level BPE splits anyway, and cut into train and
validation like a single-document corpus.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.data import CorpusSpec
from pipeline.data.jsonl import read_jsonl
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
READ_BLOCK = 2 * 2**20  # text files with a separator, and long documents, are read in blocks of this many bytes
LONG_DOCUMENT_BYTES = 64 * 2**20  # data.long_document_bytes's default: prepare's default chunk
VAL_CUT_WINDOW = 10_000  # a single document's validation part starts at the first line break this close

# Folders of the stdlib that are test suites or vendored packages, not the library itself.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split: the same text always lands in the same split."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def labelled_documents(spec: CorpusSpec, stats: dict | None = None) -> Iterator[tuple[bool, str, bool]]:
    """(is validation, text, ends a document) for every document or segment of one, in one pass
    over the corpus. A corpus of a single document (one book, one text file), and any long
    document, is cut instead: validation is its last val_fraction, from a line break on (nanoGPT's
    convention)."""
    docs = iter_documents(spec, stats)
    first = next(docs)  # the corpus has at least one document (iter_documents says so otherwise)
    second = None if isinstance(first, LongDocument) else next(docs, None)
    if second is None and isinstance(first, str):
        cut = _val_cut(first, spec.val_fraction)
        log.info(
            "data: the corpus is one document of %d characters; validation is its last %.0f%% (from character %d)",
            len(first),
            100 * spec.val_fraction,
            cut,
        )
        yield from ((False, first[:cut], True), (True, first[cut:], True))
        return
    for doc in itertools.chain([first], [] if second is None else [second], docs):
        if isinstance(doc, LongDocument):
            yield from doc.labelled(spec.val_fraction)
        else:
            yield is_val(doc, spec.val_fraction), doc, True


def split_documents(spec: CorpusSpec, split: str, stats: dict | None = None) -> Iterator[str]:
    """The documents of one split (see labelled_documents)."""
    want_val = split == "val"
    return (text for val, text, _ in labelled_documents(spec, stats) if val == want_val)


def corpus_bytes(spec: CorpusSpec) -> int | None:
    """The size of the corpus files, for a progress bar's ETA; None where it is not known in
    advance (a hub dataset; Parquet, whose files are compressed)."""
    patterns = {"stdlib": None, "text": spec.glob, "jsonl": "**/*.jsonl"}
    if spec.source not in patterns:
        return None
    files = stdlib_files() if spec.source == "stdlib" else resolve_paths(spec.paths, patterns[spec.source], "data")
    size = sum(f.stat().st_size for f in files)
    return min(size, spec.max_bytes) if spec.max_bytes else size


def _val_cut(text: str, val_fraction: float) -> int:
    """Where validation starts in a single document: the first line break after the nominal point."""
    nominal = int(len(text) * (1 - val_fraction))
    newline = text.find("\n", nominal, nominal + VAL_CUT_WINDOW)
    return newline + 1 if newline >= 0 and newline + 1 < len(text) else nominal


def utf8_len(text: str) -> int:
    """Bytes of text as stored (lone surrogates from a repaired file count as written)."""
    return len(text.encode("utf-8", "surrogatepass"))


def take_bytes(docs: Iterable[str], budget: int | None) -> Iterator[str]:
    """Yield documents until about `budget` UTF-8 bytes have been yielded (None = all)."""
    seen = 0
    for doc in docs:
        if budget is not None and seen >= budget:
            return
        seen += utf8_len(doc)
        yield doc


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib's .py files, sorted; skipped folders are not walked (site-packages can be large)."""
    files = []
    for folder, subdirs, names in os.walk(stdlib_root()):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def resolve_paths(paths: list[str], pattern: str, what: str, key: str = "data.paths") -> list[Path]:
    """Expand files, globs and directories; every entry must match at least one file."""
    if not paths:
        raise PipelineError(f"{key} is empty; give your {what} files, e.g. {key}='[corpus/]'.")
    files: list[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.glob(pattern) if f.is_file())
            if not found:
                raise PipelineError(f"{p}/ has no files matching {pattern!r}; add {what} files there.")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise PipelineError(f"{key} entry {entry!r} matches no file; check the path.")
        files.extend(found)
    return files


def _open_error(path: Path, e: OSError) -> PipelineError:
    return PipelineError(f"{path} cannot be read ({e.strerror or e}); fix its permissions or leave it out.")


def _open_bytes(path: Path):
    """The file opened for reading bytes (the caller closes it), or the one-line error."""
    try:
        return open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise _open_error(path, e) from None


def _is_binary(path: Path, head: bytes, stats: dict) -> bool:
    """A NUL byte early on: the file is skipped, with a warning, and counted."""
    if b"\x00" not in head[:8192]:
        return False
    log.warning("%s looks binary (NUL bytes); skipped", path)
    stats["binary_skipped"] = stats.get("binary_skipped", 0) + 1
    return True


def _repaired(path: Path, stats: dict) -> None:
    log.warning("%s is not valid UTF-8; undecodable bytes were replaced with U+FFFD", path)
    stats["non_utf8_replaced"] = stats.get("non_utf8_replaced", 0) + 1


def read_text(path: Path, stats: dict | None = None) -> str | None:
    """The file as text; None for a binary file (a NUL byte early on), which is skipped and counted.
    Bytes that are not UTF-8 are replaced with U+FFFD and the file is counted."""
    stats = stats if stats is not None else {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _open_error(path, e) from None
    if _is_binary(path, data, stats):
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _repaired(path, stats)
        return data.decode("utf-8", errors="replace")


_replaced = [0]  # characters replaced by the decoder below, for the non-UTF-8 warning


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += 1
    return "\ufffd", error.end


codecs.register_error("pipeline-count-replace", _count_and_replace)


def read_separated(path: Path, separator: str, stats: dict | None = None) -> Iterator[str]:
    """The parts of a text file cut at `separator`, read in blocks, so memory holds a block and one
    part, not the file. Binary files and bad UTF-8 are handled as in read_text."""
    stats = stats if stats is not None else {}
    f = _open_bytes(path)  # (a generator: closed by the with below)
    keep = len(separator) - 1  # a separator may straddle two blocks
    replaced_before = _replaced[0]
    with f:
        block = f.read(READ_BLOCK)
        if _is_binary(path, block, stats):
            return
        decoder = codecs.getincrementaldecoder("utf-8")("pipeline-count-replace")
        pending, edge = [], ""  # the unfinished part is "".join(pending) + edge (its last `keep` characters)
        while True:
            text = edge + decoder.decode(block, final=not block)
            parts = text.split(separator)
            if len(parts) > 1:
                yield "".join(pending) + parts[0]
                yield from parts[1:-1]
                pending = []
            rest = parts[-1]
            cut = max(0, len(rest) - keep)
            if cut:
                pending.append(rest[:cut])
            edge = rest[cut:]
            if not block:
                break
            block = f.read(READ_BLOCK)
        yield "".join(pending) + edge
    if _replaced[0] > replaced_before:
        _repaired(path, stats)


def bpe_cut(text: str, start: int) -> int:
    """The first place in text from `start` on to cut without changing its byte-level BPE tokens,
    or -1: just before a line break (LF or CRLF) that follows a non-space character, where the
    pre-tokenizer always splits."""
    newline = text.find("\n", start)
    while newline != -1:
        cut = newline - 1 if text[newline - 1] == "\r" else newline
        if cut > 0 and not text[cut - 1].isspace():
            return cut
        newline = text.find("\n", newline + 1)
    return -1


# A space or tab after a character that is not whitespace: GPT-2's pre-tokenizer splits there too
# (no pre-token takes a character and the whitespace after it), for text without line breaks.
_SPACE_CUT = re.compile(r"(?<=\S)[ \t]")


def space_cut(text: str, start: int) -> int:
    """Like bpe_cut, before a space or tab: for text without a usable line break."""
    found = _SPACE_CUT.search(text, max(1, start))
    return found.start() if found else -1


@dataclass
class LongDocument:
    """A text file too large to hold as one document. `labelled` reads it in segments of about
    READ_BLOCK bytes, each cut where byte-level BPE splits (so the segments' tokens are the file's),
    and cuts it into train and validation at a line break. Memory holds a block and a segment."""

    path: Path
    size: int
    stats: dict

    def labelled(self, val_fraction: float) -> Iterator[tuple[bool, str, bool]]:
        cut = self._val_cut(val_fraction)
        log.info(
            "data: %s is one document of %.1f MB, read in segments; validation is its last %.0f%% (from byte %d)",
            self.path,
            self.size / 1e6,
            100 * val_fraction,
            cut,
        )
        replaced_before = _replaced[0]
        for val, (start, end) in ((False, (0, cut)), (True, (cut, self.size))):
            yield from ((val, text, ends) for text, ends in self._segments(start, end))
        if _replaced[0] > replaced_before:
            _repaired(self.path, self.stats)

    def _val_cut(self, val_fraction: float) -> int:
        """The byte where validation starts: after the first line break past the nominal point, or
        at the nominal point, moved back to the start of a character."""
        nominal = min(int(self.size * (1 - val_fraction)), self.size - 1)
        with _open_bytes(self.path) as f:
            f.seek(nominal)
            window = f.read(VAL_CUT_WINDOW)
            newline = window.find(b"\n")
            if newline >= 0 and nominal + newline + 1 < self.size:
                return nominal + newline + 1
            f.seek(max(0, nominal - 3))
            before = f.read(min(3, nominal) + 1)  # a character's lead byte is at most 3 bytes back
        back = 0
        while back < len(before) - 1 and 0x80 <= before[-1 - back] < 0xC0:  # a UTF-8 continuation byte
            back += 1
        return nominal - back

    def _segments(self, start: int, end: int) -> Iterator[tuple[str, bool]]:
        """(text, is the last) for bytes start..end of the file, one segment per block read."""
        decoder = codecs.getincrementaldecoder("utf-8")("pipeline-count-replace")
        with _open_bytes(self.path) as f:
            f.seek(start)
            pending, left, ended, searched = "", end - start, False, 0
            while left:
                block = f.read(min(READ_BLOCK, left))
                if not block:  # the file shrank while being read
                    break
                left -= len(block)
                text = pending + decoder.decode(block, final=not left)
                cut = len(text) if not left else self._cut(text, searched, len(text) - len(block) // 2)
                if cut == -1:
                    pending, searched = text, len(text) - 1  # no cut yet: read on, and search on from here
                    continue
                pending, ended, searched = text[cut:], not left and cut == len(text), 0
                yield text[:cut], ended
            if not ended:  # the file shrank while being read
                yield pending, True

    def _cut(self, text: str, searched: int, middle: int) -> int:
        """Where to end a segment: at a line break in the new block's second half (or past what an
        earlier search saw); in text of 4 blocks without one, before a space; failing both, at
        the end, with a warning: the tokens there may differ from the whole file's."""
        cut = bpe_cut(text, max(1, searched or middle))
        if cut != -1 or len(text) < 4 * READ_BLOCK:
            return cut
        cut = max(space_cut(text, len(text) // 2), space_cut(text, 1))
        if cut != -1:
            return cut
        log.warning("%s has %d characters without a space or line break; cut there", self.path, len(text))
        self.stats["hard_cuts"] = self.stats.get("hard_cuts", 0) + 1
        return len(text)


def _text_documents(spec: CorpusSpec, files: list[Path], stats: dict) -> Iterator[str | LongDocument]:
    for path in files:
        if spec.separator:
            docs = read_separated(path, spec.separator, stats)
        elif (size := _size(path)) > (spec.long_document_bytes or LONG_DOCUMENT_BYTES):
            docs = [] if _is_binary(path, _head(path), stats) else [LongDocument(path, size, stats)]
        else:
            text = read_text(path, stats)
            docs = [text] if text is not None else []
        for doc in docs:
            if isinstance(doc, LongDocument) or doc.strip():
                yield doc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise _open_error(path, e) from None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8192)
    except OSError as e:
        raise _open_error(path, e) from None


def _jsonl_documents(spec: CorpusSpec, files: list[Path]) -> Iterator[str]:
    def text_of(row) -> str | None:
        if not isinstance(row, dict) or spec.text_field not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"no {spec.text_field!r} field (found {keys})", "set data.text_field to the field holding the text"
            )
        text = row[spec.text_field]
        return text if isinstance(text, str) and text.strip() else None

    for path in files:
        yield from read_jsonl(path, text_of)


def _parquet_documents(spec: CorpusSpec, files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise PipelineError(f"{path} is not a readable Parquet file ({e}).") from None
        if spec.text_field not in pf.schema_arrow.names:
            raise PipelineError(
                f"{path} has no column {spec.text_field!r} (columns: {pf.schema_arrow.names}); set data.text_field."
            )
        for batch in pf.iter_batches(columns=[spec.text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text


def stream_hf_dataset(name: str | None, config: str | None, split: str, key: str):
    """A streamed hub dataset (needs network); `key` names the setting in errors."""
    import datasets

    if not name:
        raise PipelineError(f"{key} is not set; give a hub dataset name, e.g. {key}=roneneldan/TinyStories.")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, auth and missing-dataset errors come in many types
        raise PipelineError(f"could not load dataset {name!r} ({type(e).__name__}: {e}).") from None


def _hf_documents(spec: CorpusSpec) -> Iterator[str]:
    for row in stream_hf_dataset(spec.name, spec.config, spec.split, "data.name"):
        if spec.text_field not in row:
            raise PipelineError(f"dataset {spec.name!r} has no field {spec.text_field!r}; set data.text_field.")
        text = row[spec.text_field]
        if isinstance(text, str) and text.strip():
            yield text


def iter_documents(spec: CorpusSpec, stats: dict | None = None) -> Iterator[str | LongDocument]:
    """All non-empty documents of the corpus, in a fixed order; errors if there are none. Text
    files read whole that are larger than data.long_document_bytes come as a LongDocument.
    `stats` (optional) collects counts of skipped binary and repaired non-UTF-8 files."""
    stats = stats if stats is not None else {}
    if spec.source == "stdlib":
        docs = _text_documents(spec, stdlib_files(), stats)
    elif spec.source == "text":
        docs = _text_documents(spec, resolve_paths(spec.paths, spec.glob, "text"), stats)
    elif spec.source == "jsonl":
        docs = _jsonl_documents(spec, resolve_paths(spec.paths, "**/*.jsonl", "JSONL"))
    elif spec.source == "parquet":
        docs = _parquet_documents(spec, resolve_paths(spec.paths, "**/*.parquet", "Parquet"))
    else:
        docs = _hf_documents(spec)
    count = size = 0
    for doc in docs:
        limit = (
            "max_docs"
            if spec.max_docs and count >= spec.max_docs
            else "max_bytes"
            if spec.max_bytes and size >= spec.max_bytes
            else None
        )
        if limit:
            log.info(
                "data: stopped reading the corpus at data.%s=%d (%d documents)", limit, getattr(spec, limit), count
            )
            return
        length = doc.size if isinstance(doc, LongDocument) else utf8_len(doc) if spec.max_bytes else 0
        count, size = count + 1, size + length
        yield doc
    if count == 0:
        where = ", ".join(spec.paths) or spec.name or spec.source
        raise PipelineError(f"the corpus ({where}) contains no text; point data.paths at non-empty files.")

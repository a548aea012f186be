"""Encoding the corpus into chunk shards: the document stream cut into chunks (the unit of work
per rank and of resume), long documents cut into pieces that keep their tokens, batches encoded
on every core by `tokenizers`' Rust threads."""

from __future__ import annotations

import hashlib

import numpy as np
from tokenizers import Tokenizer

from pipeline.data.shards import SPLITS, ChunkWriter
from pipeline.data.sources import utf8_len

BATCH_BYTES = 8 * 2**20  # documents are encoded in batches of about this much text
PIECE_CHARS = 2**18  # longer documents are encoded in pieces of about this size, in parallel


class Chunks:
    """Cuts (is validation, document) pairs into consecutive chunks: a chunk ends with the document
    that brings it to `chunk_bytes`. Iterating yields (chunk, batch) for the chunks `mine` accepts,
    in batches of about `batch_bytes`; afterwards `count` is the number of chunks in the corpus.

    A running hash of the documents is kept: `ends[chunk]` identifies the corpus up to the end of
    that chunk, and `at_end(chunk, hash)` is called there (a resumed prepare checks that a chunk it
    kept still holds the same text)."""

    def __init__(
        self,
        labelled,
        chunk_bytes: int,
        batch_bytes: int,
        mine,
        progress=lambda n: None,
        at_end=lambda chunk, digest: None,
    ):
        self.labelled, self.chunk_bytes, self.batch_bytes = labelled, chunk_bytes, batch_bytes
        self.mine, self.progress, self.at_end = mine, progress, at_end
        self.count, self.ends = 0, {}

    def _end(self, chunk: int, stream) -> None:
        self.ends[chunk] = stream.hexdigest()
        self.at_end(chunk, self.ends[chunk])

    def __iter__(self):
        chunk, size, batch, batch_size = 0, 0, [], 0
        stream = hashlib.sha1()
        for item in self.labelled:
            data = item[1].encode("utf-8", "surrogatepass")
            stream.update(b"V" if item[0] else b"T")
            stream.update(data)
            stream.update(b"\0")
            n = len(data)
            self.progress(n)
            if self.mine(chunk):
                batch.append(item)
                batch_size += n
            size += n
            chunk_ends = size >= self.chunk_bytes
            if chunk_ends:
                self._end(chunk, stream)
            if batch and (chunk_ends or batch_size >= self.batch_bytes):
                yield chunk, batch
                batch, batch_size = [], 0
            if chunk_ends:
                chunk, size = chunk + 1, 0
        if size:
            self._end(chunk, stream)
        if batch:
            yield chunk, batch
        self.count = chunk + (size > 0)


def pieces(doc: str, size: int = PIECE_CHARS) -> list[str]:
    """A long document cut into pieces of about `size` characters. Each cut is just before a line
    break (LF or CRLF) that follows a non-space character: byte-level BPE's pre-tokenizer always
    splits there, so the pieces' tokens, concatenated, are the document's tokens."""
    out, start = [], 0
    while len(doc) - start > size:
        newline = doc.find("\n", start + size)
        while newline != -1:
            cut = newline - 1 if doc[newline - 1] == "\r" else newline
            if cut > start and not doc[cut - 1].isspace():
                break
            newline = doc.find("\n", newline + 1)
        if newline == -1:
            break
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def encode_documents(encode, docs: list[str], dtype, piece_chars: int = PIECE_CHARS) -> list[list[np.ndarray]]:
    """Each document's token ids (as arrays, one per piece). Pieces are encoded in parallel groups
    of about BATCH_BYTES, so one huge document uses every core and bounded memory."""
    ids: list[list[np.ndarray]] = [[] for _ in docs]
    group, size = [], 0
    work = [(i, piece) for i, doc in enumerate(docs) for piece in pieces(doc, piece_chars)]
    for n, (i, piece) in enumerate(work):
        group.append((i, piece))
        size += len(piece)
        if size >= BATCH_BYTES or n == len(work) - 1:
            for (owner, _), e in zip(group, encode([p for _, p in group], add_special_tokens=False)):
                ids[owner].append(np.array(e.ids, dtype=dtype))
            group, size = [], 0
    return ids


def encode_chunks(tok: Tokenizer, chunks: Chunks, out, dtype, eos_id: int, fingerprint: str) -> list[int]:
    """Encode the accepted chunks (Rust threads) and write each document, with EOS after it, to its
    chunk's shard of its split. Memory is one batch. Returns the chunks written."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no character offsets: ~1.6x faster
    eos = np.array([eos_id], dtype=dtype)
    writer, written = None, []
    for chunk, batch in chunks:
        if writer is None or writer.chunk != chunk:
            if writer is not None:
                writer.seal(chunks.ends[writer.chunk])
                written.append(writer.chunk)
            writer = ChunkWriter(out, chunk, dtype, fingerprint)
        ids = encode_documents(encode, [doc for _, doc in batch], dtype)
        for split in SPLITS:
            mine = [(doc, parts) for (val, doc), parts in zip(batch, ids) if val == (split == "val")]
            if mine:
                tokens = np.concatenate([a for _, parts in mine for a in (*parts, eos)])
                writer.write(split, tokens, len(mine), sum(utf8_len(doc) for doc, _ in mine))
    if writer is not None:
        writer.seal(chunks.ends[writer.chunk])
        written.append(writer.chunk)
    return written

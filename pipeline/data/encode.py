"""Encoding the corpus into chunk shards: the document stream cut into chunks (the unit of work
per rank and of resume), long documents cut into pieces that keep their tokens, batches encoded
on every core by `tokenizers`' Rust threads."""

from __future__ import annotations

import hashlib

import numpy as np
from tokenizers import Tokenizer

from pipeline.data.shards import SPLITS, ChunkWriter
from pipeline.data.sources import bpe_cut, utf8_len

BATCH_BYTES = 2 * 2**20  # documents are taken from the stream in batches of about this much text
ENCODE_BYTES = 2 * 2**20  # ... and encoded in groups of about this much: the encodings take ~50x its size
PIECE_CHARS = 2**17  # longer documents are encoded in pieces of about this size, in parallel


class Chunks:
    """Cuts (is validation, text, ends a document) items into consecutive chunks: a chunk ends with
    the item that brings it to `chunk_bytes`. Longer items are first cut where BPE splits anyway,
    so a long document's segments fill chunks of about chunk_bytes with the same tokens. Iterating
    yields (chunk, batch) for the chunks `mine` accepts, in batches of about `batch_bytes`;
    afterwards `count` is the number of chunks in the corpus.

    A running hash of the documents is kept, fed a segment at a time: `ends[chunk]` identifies the
    corpus up to the end of that chunk, and `at_end(chunk, hash)` is called there (a resumed
    prepare checks that a chunk it kept still holds the same text)."""

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
        stream, starts_document = hashlib.sha1(), True
        for val, text, ends in self._no_larger_than_a_chunk(self.labelled):
            item = (val, text, ends)
            data = text.encode("utf-8", "surrogatepass")
            if starts_document:
                stream.update(b"V" if val else b"T")
            stream.update(data)
            if ends:
                stream.update(b"\0")
            starts_document = ends
            n = len(data)
            del data
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

    def _no_larger_than_a_chunk(self, labelled):
        """Items of more than a chunk's characters cut where BPE splits anyway (see pieces)."""
        for val, text, ends in labelled:
            if len(text) <= self.chunk_bytes:
                yield val, text, ends
                continue
            parts = pieces(text, self.chunk_bytes)
            del text
            for i, part in enumerate(parts):
                yield val, part, ends and i == len(parts) - 1


def pieces(doc: str, size: int = PIECE_CHARS) -> list[str]:
    """A long document cut into pieces of about `size` characters, where byte-level BPE splits
    anyway (sources.bpe_cut), so the pieces' tokens, concatenated, are the document's tokens."""
    out, start = [], 0
    while len(doc) - start > size and (cut := bpe_cut(doc, start + max(size, 2))) != -1:  # cut > start
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def encode_documents(encode, docs: list[str], dtype, piece_chars: int = PIECE_CHARS) -> list[list[np.ndarray]]:
    """Each document's token ids (as arrays, one per piece). Pieces are encoded in parallel groups
    of about ENCODE_BYTES, so one huge document uses every core and bounded memory."""
    ids: list[list[np.ndarray]] = [[] for _ in docs]
    group, size = [], 0
    work = [(i, piece) for i, doc in enumerate(docs) for piece in pieces(doc, piece_chars)]
    for n, (i, piece) in enumerate(work):
        group.append((i, piece))
        size += len(piece)
        if size >= ENCODE_BYTES or n == len(work) - 1:
            for (owner, _), e in zip(group, encode([p for _, p in group], add_special_tokens=False)):
                ids[owner].append(np.array(e.ids, dtype=dtype))
            group, size = [], 0
    return ids


def encode_chunks(tok: Tokenizer, chunks: Chunks, out, dtype, eos_id: int, fingerprint: str) -> list[int]:
    """Encode the accepted chunks (Rust threads) and write each document, with EOS after it (after
    a long document's last segment), to its chunk's shard of its split. Memory is one batch.
    Returns the chunks written."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no character offsets: ~1.6x faster
    eos = np.array([eos_id], dtype=dtype)
    writer, written = None, []
    for chunk, batch in chunks:
        if writer is None or writer.chunk != chunk:
            if writer is not None:
                writer.seal(chunks.ends[writer.chunk])
                written.append(writer.chunk)
            writer = ChunkWriter(out, chunk, dtype, fingerprint)
        ids = encode_documents(encode, [text for _, text, _ in batch], dtype)
        for split in SPLITS:
            mine = [(text, ends, parts) for (val, text, ends), parts in zip(batch, ids) if val == (split == "val")]
            if mine:
                tokens = np.concatenate([a for _, ends, parts in mine for a in (*parts, *([eos] if ends else []))])
                ended = sum(ends for _, ends, _ in mine)
                writer.write(split, tokens, ended, sum(utf8_len(text) for text, _, _ in mine))
    if writer is not None:
        writer.seal(chunks.ends[writer.chunk])
        written.append(writer.chunk)
    return written

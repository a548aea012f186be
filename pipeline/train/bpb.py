"""Bits per byte, the tokenizer-independent measure of a language model, and what general-purpose
compressors (gzip -9, xz -9e) reach on the same text: the bars a language model should beat."""

from __future__ import annotations

import gzip
import lzma
import math


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    return loss_sum_nats / (math.log(2) * max(num_bytes, 1))


def gzip_bits_per_byte(data: bytes) -> float:
    return 8 * len(gzip.compress(data, compresslevel=9)) / max(len(data), 1)


def xz_bits_per_byte(data: bytes) -> float:
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / max(len(data), 1)


def compressor_references(pieces: list[bytes], token_ids: list[int]) -> dict[str, float]:
    """{"gzip9_val_bpb", "xz9_val_bpb"}: bits per byte of the text that `token_ids` stand for."""
    text = b"".join(pieces[t] for t in token_ids)
    return {"gzip9_val_bpb": gzip_bits_per_byte(text), "xz9_val_bpb": xz_bits_per_byte(text)}


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_strings(tokenizer) -> list[bytes]:
    """The UTF-8 bytes each token id stands for; special tokens stand for no text (b"").

    Exact for byte-level BPE (ours, GPT-2, Llama 3); other tokenizers (SentencePiece) fall back
    to decoding each token alone, which is close but not exact for pieces of a character.
    """
    decoder = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = all(c in decoder for p in pieces if p for c in p)
    out = []
    for i, piece in enumerate(pieces):
        if i in special or not piece:
            out.append(b"")
        elif byte_level:
            out.append(bytes(decoder[c] for c in piece))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out

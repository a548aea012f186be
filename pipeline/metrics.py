"""Throughput and quality numbers: MFU, peak memory, bits per byte, gzip reference, curves PNG."""

from __future__ import annotations

import gzip
import json
import math
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peak FLOP/s by device name substring (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process' peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    return loss_sum_nats / (math.log(2) * max(num_bytes, 1))


def gzip_bits_per_byte(data: bytes) -> float:
    return 8 * len(gzip.compress(data, compresslevel=9)) / max(len(data), 1)


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


class MetricsFile:
    """Append-only metrics.jsonl; on resume, entries past the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        path.write_text("".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def plot_curves(rows: list[dict], out: Path, reference_bpb: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        a.plot(*zip(*train))
    a.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    if val:
        b.plot(*zip(*val), marker="o", label="model")
    if reference_bpb:
        b.axhline(reference_bpb, color="gray", linestyle="--", label="gzip -9")
    b.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

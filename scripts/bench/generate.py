"""Generation speed: prefill and decode tokens/s at batch 1 and batch 8, as JSON: the model as
pipeline loads it (`load_model`: on a CPU fp32 or bf16 weights, whichever it measured faster),
and with --plain the same model as plain transformers loads it (fp32, then `model.generate`).

    python scripts/bench/generate.py runs/quickstart            # the run's newest model
    python scripts/bench/generate.py path/to/hf_model --prompt-tokens 512 --new-tokens 128
    python scripts/bench/generate.py SmolLM2-135M-Instruct.Q4_1.gguf --plain

Prefill = one forward over the prompts; decode = the rest of generate() with the KV cache
(greedy, EOS ignored so every sequence decodes exactly --new-tokens tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.model.hf_dir import load_causal_lm  # noqa: E402
from pipeline.model.inference import load_model, resolve_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, vocab: int, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(10, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)  # warm-up
    prefill, total = [], []
    for _ in range(repeats):
        sync(model.device)
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        sync(model.device)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(model.device)
        total.append(time.perf_counter() - t0)
    p, t = min(prefill), min(total)
    return {
        "batch": batch,
        "prefill_tokens_per_s": round(batch * prompt_tokens / p, 1),
        "decode_tokens_per_s": round(batch * new_tokens / max(t - p, 1e-9), 1),
    }


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("target", help="run dir, HF model dir or adapter dir")
    a.add_argument("--prompt-tokens", type=int, default=128)
    a.add_argument("--new-tokens", type=int, default=64)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--plain", action="store_true", help="also plain transformers: fp32 weights, model.generate")
    args = a.parse_args()
    choice = resolve_model(args.target)
    model, tokenizer = load_model(choice)

    def both_batches(m) -> list[dict]:
        return [measure(m, len(tokenizer), b, args.prompt_tokens, args.new_tokens, args.repeats) for b in (1, 8)]

    report = {
        "model": choice.describe(),
        "device": str(model.device),
        "dtype": str(model.dtype),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "results": both_batches(model),
    }
    if args.plain:
        del model
        plain = load_causal_lm(choice.model_dir, dtype=torch.float32)
        if choice.adapter_dir:
            from peft import PeftModel

            plain = PeftModel.from_pretrained(plain, choice.adapter_dir)
        plain = plain.to(report["device"]).eval()
        report["plain_fp32"] = both_batches(plain)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

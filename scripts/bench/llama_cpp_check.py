"""An exported GGUF file run in llama.cpp (llama-cpp-python) against the HF model it came from:
the same prompt tokens, and greedy answers compared token by token. Prints JSON: per prompt whether
the tokenization and the greedy tokens are equal (else where they first differ), and the shares.

    pipeline export runs/quickstart --type f16,q8_0 --out export/   # or a fine-tuned SmolLM2's merged dir
    pip install llama-cpp-python                                       # builds llama.cpp (minutes)
    python scripts/bench/llama_cpp_check.py export/model-f16.gguf runs/quickstart/finetune/merged

llama-cpp-python is not a dependency of pipeline; on a package index without its wheels, pip
compiles it (cmake and a C++ compiler).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.eval.tasks import function_tasks  # noqa: E402
from pipeline.model.inference import add_special_tokens, format_prompt, load_model, resolve_model  # noqa: E402
from pipeline.model.tokenizer import stop_ids  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where a and b differ (a length counts), or None where they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_greedy(model, ids: list[int], new_tokens: int, stops: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
    )
    answer = out[0, len(ids) :].tolist()
    return answer[: next((k + 1 for k, t in enumerate(answer) if t in stops), len(answer))]


def llama_greedy(llm, ids: list[int], new_tokens: int, stops: list[int]) -> list[int]:
    llm.reset()
    answer = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        answer.append(token)
        if token in stops or len(answer) == new_tokens:
            break
    return answer


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("gguf", help="the exported .gguf file")
    p.add_argument("source", help="the HF model (run dir, model dir or adapter dir) it was exported from")
    p.add_argument("--prompts", type=int, default=16, help="the eval's function prompts, in order")
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    from llama_cpp import Llama

    choice = resolve_model(args.source)
    model, tokenizer = load_model(choice, dtype="fp32")
    stops = stop_ids(tokenizer, model)
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    rows = []
    bos = add_special_tokens(tokenizer, choice.chat)  # a plain base's prompt starts with its BOS
    for task in function_tasks(args.prompts):
        text = format_prompt(tokenizer, task.messages if choice.chat else task.messages[0]["content"], choice.chat)
        ids = tokenizer(text, add_special_tokens=bos)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=bos, special=True)
        ours_answer = hf_greedy(model, ids, args.new_tokens, stops)
        their_answer = llama_greedy(llm, ids, args.new_tokens, stops)
        rows.append(
            {
                "task": task.name,
                "same_prompt_tokens": theirs == ids,
                "same_greedy": ours_answer == their_answer,
                "first_difference": first_difference(ours_answer, their_answer),
                "tokens": len(ours_answer),
            }
        )
    print(
        json.dumps(
            {
                "gguf": args.gguf,
                "source": choice.describe(),
                "prompts": len(rows),
                "same_prompt_tokens": sum(r["same_prompt_tokens"] for r in rows) / len(rows),
                "same_greedy": sum(r["same_greedy"] for r in rows) / len(rows),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Streaming multi-turn chat with the newest model of a run (or any HF model / adapter dir).

    python scripts/chat.py runs/quickstart
    python scripts/chat.py /models/my-llama --adapter runs/exp1/finetune/adapter --system "Be brief."
    printf 'Write a function that reverses a list\n' | python scripts/chat.py runs/quickstart

In a terminal: tokens stream as they are generated; /reset clears the conversation,
/system TEXT sets the system prompt, /exit (or Ctrl-D) quits, Ctrl-C stops the answer being
written. When stdin is not a terminal, every line is one user message and the answers go to
stdout, so the script can be scripted.
A base model (no chat template of its own, or one this project pretrained) gets plain completion
mode: each message is continued as text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from threading import Event, Thread

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.run import Sampling  # noqa: E402
from pipeline.errors import PipelineError, first_line  # noqa: E402
from pipeline.model.inference import (  # noqa: E402
    add_special_tokens,
    format_prompt,
    load_model,
    resolve_model,
)
from pipeline.model.tokenizer import stop_ids  # noqa: E402
from pipeline.requirements import check_versions  # noqa: E402


def context_window(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(n, tokenizer.model_max_length or n)


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], str]:
    """Drop the oldest turns (never the system prompt or the newest message) until the prompt fits."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while True:
        prompt = format_prompt(tokenizer, system + turns, chat=True)
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget or len(turns) <= 1:
            return system + turns, prompt
        turns = turns[2:] if len(turns) > 2 else turns[1:]


class StopOnEvent(StoppingCriteria):
    """Generation ends at the next token once the event is set (Ctrl-C)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_answer(
    model, tokenizer, prompt: str, sampling: Sampling, out, chat: bool = True
) -> tuple[str, int, float, bool]:
    """Generate in a thread and print tokens as they arrive; returns (text, tokens, seconds,
    interrupted). Ctrl-C stops the generation itself, so the next turn never runs beside it; an
    error inside generation is raised here instead of leaving the stream waiting."""
    special = add_special_tokens(tokenizer, chat)
    # No token_type_ids: generate in transformers < 4.57 refuses them for causal LMs.
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=special, return_token_type_ids=False)
    enc = enc.to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = Event()
    torch.manual_seed(sampling.seed)
    kwargs = dict(
        **enc,
        **sampling.generate_kwargs(),
        streamer=streamer,
        eos_token_id=stop_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
    )
    result = {}

    def work():
        try:
            result["ids"] = model.generate(**kwargs)
        except BaseException as e:  # reported by the caller's thread
            result["error"] = e
            streamer.text_queue.put(streamer.stop_signal)  # wakes the loop below, whatever state it is in

    t0 = time.perf_counter()
    thread = Thread(target=work, daemon=True)
    thread.start()
    pieces, interrupted = [], False
    try:
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        for _ in streamer:  # the generation ends at its next token
            pass
    finally:
        stop.set()  # a second Ctrl-C above: the generation still ends before the next turn starts
        thread.join()
    seconds = time.perf_counter() - t0
    out.write("\n")
    if "error" in result:
        raise PipelineError(f"generation failed ({type(result['error']).__name__}: {first_line(result['error'])})")
    new_tokens = result["ids"].shape[1] - enc["input_ids"].shape[1]
    return "".join(pieces), new_tokens, seconds, interrupted


def main() -> None:
    p = argparse.ArgumentParser(
        description="Streaming multi-turn chat in the terminal.",
        epilog="Commands: /reset, /system TEXT, /exit (or Ctrl-D).",
    )
    p.add_argument("target", help="a run dir (runs/NAME), an HF model dir, or an adapter dir")
    p.add_argument("--adapter", help="a PEFT adapter dir to apply on the model")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--completion", action="store_true", help="plain completion mode even for chat models")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights; auto: the GPU's half precision, on a CPU fp32 or bf16, whichever generates faster",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the chat
    try:
        check_versions()
        choice = resolve_model(args.target, args.adapter)
        model, tokenizer = load_model(choice, args.trust_remote_code, args.dtype)
        sampling = Sampling(
            args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed
        )
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    chat = choice.chat and not args.completion and bool(tokenizer.chat_template)
    interactive = sys.stdin.isatty()
    budget = max(16, context_window(model, tokenizer) - args.max_new_tokens)
    print(
        f"[{choice.describe()} | {'chat' if chat else 'completion'} mode | {model.device}]"
        + (" /reset /system TEXT /exit" if interactive else ""),
        file=sys.stderr,
    )

    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            messages = [{"role": "system", "content": text[len("/system") :].strip()}] + [
                m for m in messages if m["role"] != "system"
            ]
            print("[system prompt set]", file=sys.stderr)
            continue
        if chat:
            messages, prompt = fit_history(tokenizer, messages + [{"role": "user", "content": text}], budget)
        else:
            prompt = format_prompt(tokenizer, text, chat=False)
        if interactive:
            sys.stdout.write("bot> ")
        try:
            answer, n, seconds, interrupted = stream_answer(model, tokenizer, prompt, sampling, sys.stdout, chat)
        except (PipelineError, KeyboardInterrupt) as e:  # an error, or a second Ctrl-C while it wound down
            note = f"error: {e}; " if isinstance(e, PipelineError) else "\n[interrupted] "
            print(f"{note}the conversation is kept without that question", file=sys.stderr)
            if chat:
                messages.pop()  # the unanswered question: roles keep alternating
            continue
        if chat:
            messages.append({"role": "assistant", "content": answer})
        stopped = ", stopped by Ctrl-C" if interrupted else ""
        print(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s{stopped}]", file=sys.stderr)


if __name__ == "__main__":
    main()

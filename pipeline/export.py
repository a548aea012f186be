"""`pipeline export TARGET`: a model as GGUF for llama.cpp, Ollama and LM Studio, with a Modelfile.

    pipeline export runs/quickstart                      # the run's newest model, q8_0
    pipeline export runs/quickstart --type f16,q8_0      # one file per type
    pipeline export /models/SmolLM2-135M-Instruct --out exported/

TARGET is what chat.py takes: a run dir (its merged model, else adapter on its base, else the
pretrained model), an HF model dir or an adapter dir (merged in memory). Files go to --out
(default: TARGET/export/ for a run dir, else ./export/): model.<type>.gguf and a Modelfile for
`ollama create NAME -f Modelfile`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pipeline export", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="run dir, HF model dir or adapter dir")
    p.add_argument("--type", default="q8_0", help="comma-separated: f16, q8_0 (default q8_0)")
    p.add_argument("--out", help="output folder (default: TARGET/export for a run dir, else ./export)")
    args = p.parse_args(argv)
    import torch

    from pipeline.model.gguf_export import TYPES, ollama_modelfile, write_gguf
    from pipeline.model.inference import load_model, resolve_model

    types = [t.strip() for t in args.type.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise PipelineError(f"--type {args.type!r}: use one or more of {', '.join(TYPES)}.")
    choice = resolve_model(args.target)
    run_dir = Path(args.target)
    default = run_dir / "export" if (run_dir / "history.jsonl").exists() else Path("export")
    out = Path(args.out) if args.out else default
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(choice, dtype="fp32", device=torch.device("cpu"))  # the writer reads numpy
    if choice.adapter_dir:
        model = model.merge_and_unload()
    name = Path(choice.describe().split(" + ")[0]).name
    written = []
    for qtype in types:
        facts = write_gguf(model, tokenizer, out / f"model.{qtype}.gguf", qtype, name, choice.chat)
        written.append(facts)
        print(json.dumps(facts), file=sys.stderr)
    modelfile = out / "Modelfile"
    modelfile.write_text(ollama_modelfile(tokenizer, Path(written[-1]["file"]).name, choice.chat))
    print(f"exported {choice.describe()} -> {', '.join(w['file'] for w in written)}, {modelfile}", file=sys.stderr)
    return 0

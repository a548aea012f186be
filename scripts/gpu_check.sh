#!/usr/bin/env bash
# The CUDA path in one go, in under 9 minutes on one GPU (the step limits add up to 560 s); figures
# as JSON, written even if the script is killed part-way.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT if set (the device tool), else ./gpu_check
#
# Needs a CUDA build of torch and this project installed (pip install -e '.[test]') on that machine.
# Runs, each under its own time limit so one failure does not stop the rest:
#   env        GPU name, torch/CUDA versions, bf16 support
#   tests      the trainer, precision/time-budget and pre-flight tests, on the GPU (CUDA path of the loop)
#   chat_families  template masks and QLoRA (finetune.quantize=4bit; skipped without bitsandbytes)
#   bench_*    scripts/bench/pretrain.py on gpt2_124m in bf16, eager and torch.compile: tokens/s, MFU, peak
#              memory; and the small model in fp16 (loss scaling, overflow-skipped steps)
#   fsdp1      `accelerate launch` with conf/accelerate/fsdp.yaml on 1 process: a tiny pretrain end to end
#   lora       scripts/bench/finetune.py: LoRA on a random ~0.45B model (350m shape, 50k vocab) in bf16
#   generate   scripts/bench/generate.py on the fsdp1 model: prefill/decode tokens/s
# and writes OUT_DIR/gpu_check.json with every step's exit status and JSON figures (logs beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
work=$(mktemp -d)
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

merge() {  # every finished step's exit status and figures -> gpu_check.json
  python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {}
for rc in sorted(out.glob("*.rc")):
    name, text = rc.stem, (out / f"{rc.stem}.out").read_text().strip()
    entry = {"exit": int(rc.read_text())}
    last = text.splitlines()[-1] if text else ""
    try:
        entry["figures"] = json.loads(last)
    except ValueError:
        entry["tail"] = text[-500:] or (out / f"{name}.log").read_text()[-500:]
    report[name] = entry
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PY
  rm -rf "$work"
}
trap merge EXIT

step() {  # step NAME SECONDS CMD...: run, keep stdout (JSON) and stderr, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check $(date +%T)] $name: $*" >&2
  timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"
  echo $? > "$out/$name.rc"
  echo "[gpu_check $(date +%T)] $name: exit $(cat "$out/$name.rc")" >&2
}

step env 20 python -c 'import json, torch; print(json.dumps({"gpu": torch.cuda.get_device_name(0),
  "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported(),
  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)}))'
step tests 100 python -m pytest -q -x -m "not slow" tests/test_training.py tests/test_autotune.py tests/test_preflight.py tests/test_chunked_loss.py \
  tests/test_lora_dtypes.py "tests/test_chat_data.py::test_flash_attention_on_a_flattened_micro_batch_gives_the_rows_sdpa_losses"
step chat_families 60 python -m pytest -q tests/test_chat_families.py -m "not slow"
bench=(python scripts/bench/pretrain.py --model gpt2_124m --vocab 50304 --seq-len 1024 --micro-batch 16
       --batch-tokens 131072 --steps 20 --warmup 5 --precision bf16 --skip-bare)
step bench_eager 80 "${bench[@]}"
step bench_compile 120 "${bench[@]}" --compile true
step bench_fp16 50 python scripts/bench/pretrain.py --model small --steps 20 --warmup 5 --precision fp16 --skip-bare
step fsdp1 70 accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 1 -m pipeline \
  stage=pretrain model=tiny train=tiny tokenizer.vocab_size=512 data.max_docs=200 \
  run.root="$work/runs" run.name=fsdp1
step lora 70 python scripts/bench/finetune.py --model 350m --vocab 50304 --seq-len 1024 --micro-batch 8 \
  --batch-tokens 16384 --steps 12 --warmup 4 --precision bf16
step generate 50 python scripts/bench/generate.py "$work/runs/fsdp1" --repeats 2


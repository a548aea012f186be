"""The `pipeline` command: compose the Hydra config, then build the requested stage(s).

    pipeline recipe=quickstart                  # every stage, offline, CPU (plain `pipeline`: the same
                                                # stages, a larger model, LoRA, answers not run)
    pipeline stage=prepare run.name=t           # tokenizer + token shards only
    pipeline recipe=gpt2_124m data=text data.paths='[corpus/]'
    accelerate launch --num_processes 8 -m pipeline recipe=gpt2_124m
    pipeline -m stage=pretrain train.lr=1e-3,3e-3 run.name=lr   # a sweep: a run per combination
    pipeline report runs/lr                     # compare finished runs

Every rank of a multi-process launch composes the same config; only the main process writes
`.hydra/`, manifests and logs, and the run directory is fixed by run.root/run.name (no
timestamps, no chdir), so all ranks agree on it.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

from pipeline.config.compose import (
    CONF_DIR,
    DEFAULT_RECIPE,
    RECIPES_DIR,
    compose_config,
    config_yaml,
    save_run_config,
)
from pipeline.config.stages import STAGE_CHOICES, chain
from pipeline.errors import PipelineError, TrainingStopped, first_line
from pipeline.requirements import check_versions

log = logging.getLogger("pipeline")


def print_help() -> None:
    groups = {
        g.name: ", ".join(sorted(p.stem for p in g.glob("*.yaml")))
        for g in sorted(CONF_DIR.iterdir())
        if g.is_dir() and g.name != "accelerate"
    }
    recipes = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    print(__doc__.strip().split("\n\n")[0])
    print("\nUsage: pipeline [recipe=NAME|path.yaml] [stage=STAGE] [key=value ...] [--cfg] [--help]")
    print("       pipeline -m|--multirun key=a,b other=x,y ...   (Hydra sweep grammar: a,b  range()  glob())")
    print("       pipeline report DIR... [--out DIR]")
    print("       pipeline export TARGET [--type f16,q8_0] [--out DIR]   (GGUF + Ollama Modelfile)\n")
    print(f"  stage     {' | '.join(STAGE_CHOICES)}  (default all; upstream stages are built as needed)")
    print(f"  recipe    {recipes}  (default {DEFAULT_RECIPE})")
    for name, choices in groups.items():
        print(f"  {name:<9} {choices}")
    print("\n  run.name=NAME run.root=DIR   artifacts in DIR/NAME/<stage>/ (default runs/<recipe>)")
    print("  force=true | force=[stage]    rebuild even when up to date")
    print("  sweep.launch='accelerate launch ...'   how -m starts each run (default: python -m pipeline)")
    print("  run.shared_upstream=true      link artifacts of the same config and inputs from run.root/.shared/")
    print("  --cfg                         print the composed config and exit")
    print(f"\nConfig groups: {CONF_DIR}\nRecipes: {RECIPES_DIR}")


def setup_logging(is_main: bool) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not user news
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="[%(asctime)s pipeline] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # accelerate narrates every checkpoint file and warns that tied weights are saved once.
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def keep_wandb_local(run_dir: Path) -> None:
    """wandb stays offline unless the user chose a mode or logged in, and writes under the run
    (so does matplotlib's font cache)."""
    cache = run_dir / ".cache"
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(cache / "wandb"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    logged_in = "WANDB_API_KEY" in os.environ or "api.wandb.ai" in _read(Path.home() / ".netrc")
    if "WANDB_MODE" not in os.environ and not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def run(argv: list[str]) -> None:
    if argv[:1] == ["export"]:
        from pipeline.export import main as export

        setup_logging(is_main=True)  # a first GGUF import or a large model takes a while: say so
        raise SystemExit(export(argv[1:]))
    if argv[:1] == ["report"]:
        from pipeline.report import main as report

        raise SystemExit(report(argv[1:]))
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return
    if any(a in ("-m", "--multirun") for a in argv):
        from pipeline.sweep import run_sweep

        raise SystemExit(run_sweep([a for a in argv if a not in ("-m", "--multirun")]))
    overrides = [a for a in argv if a != "--cfg"]
    cfg, specs = compose_config(overrides, validate="--cfg" not in argv)
    if "--cfg" in argv:
        print(config_yaml(cfg), end="")
        return

    from accelerate import PartialState

    from pipeline.device import has_accelerator
    from pipeline.lock import RunLock
    from pipeline.runner import Runner

    # cpu=True lets a torchrun/`accelerate launch --multi_gpu` start on a machine without GPUs
    # join a gloo process group instead of silently running N independent single processes.
    state = PartialState(cpu=not has_accelerator(), timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    setup_logging(state.is_main_process)
    for note in specs.notes:
        log.info(note)
    run_dir = Path(cfg.run.root) / cfg.run.name
    keep_wandb_local(run_dir)
    # The main process owns the run dir for the whole command; other ranks of a launch share it.
    with RunLock(run_dir) if state.is_main_process else nullcontext():
        if state.is_main_process:
            save_run_config(run_dir, cfg, overrides)
        targets = chain(specs) if cfg.stage == "all" else [cfg.stage]
        runner = Runner(specs, run_dir, specs.force, cfg.run.shared_upstream)
        for name in targets:
            runner.ensure(name)
    warnings = [f"{a.stage}: {w}" for a in runner.done.values() for w in a.facts.get("warnings", [])]
    if warnings:  # the command's last line says that the model is short of what was meant, and why
        log.warning("done, but %s -> %s", "; ".join(warnings), run_dir)
    else:
        log.info("done: %s -> %s", ", ".join(targets), run_dir)


def torch_distributed_errors() -> tuple[type, ...]:
    import torch.distributed as dist

    return tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)


def share_tokenizer_threads() -> None:
    """Several processes on one node each size `tokenizers`' thread pool to the whole machine;
    give each its share instead (measured faster with 2 processes on 2 cores). RAYON_NUM_THREADS
    set by the user wins."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and "RAYON_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["RAYON_NUM_THREADS"] = str(max(1, cores // local))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    share_tokenizer_threads()
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("PIPELINE_DEBUG") == "1"
    try:
        check_versions()
        run(argv)
    except PipelineError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch_distributed_errors() as e:
        if debug:
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"error: rank {rank} on {socket.gethostname()}: a collective operation failed or timed out "
            f"({first_line(e)}); check the other ranks' logs for the first error, or raise "
            f"distributed.timeout_minutes.",
            file=sys.stderr,
        )
        sys.exit(3)
    except TrainingStopped as e:
        resume = shlex.join(["pipeline", *[a for a in argv if not a.startswith(("force=", "resume="))]])
        print(f"{e}. Resume with: {resume}", file=sys.stderr)
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (completed stages are kept).", file=sys.stderr)
        sys.exit(130)

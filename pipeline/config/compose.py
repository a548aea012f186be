"""Compose conf/ + a recipe + command-line overrides into one checked config (Hydra), and build
every stage's spec from it, so a bad value fails before any stage runs."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import data, model, run, train
from pipeline.config.stages import STAGE_CHOICES
from pipeline.errors import PipelineError, first_line

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "standard"  # every stage, model=small, LoRA (recipes/standard.yaml)
TRAINING_GROUPS = ("train", "finetune.train", "preference.train")  # where max_steps and time_budget meet
WHERE = {0: "a config group default", 1: "the recipe", 2: "the command line"}


def _shipped(name: str) -> Path:
    """conf/ and recipes/ sit inside the package in a wheel, next to it in a source checkout."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR, RECIPES_DIR = _shipped("conf"), _shipped("recipes")


def recipe_location(recipe: str) -> tuple[Path, str]:
    """(directory, config name) of a recipe given by name (recipes/NAME.yaml) or by path."""
    if recipe.endswith((".yaml", ".yml")) or os.sep in recipe:
        path = Path(recipe).expanduser().resolve()
        if not path.is_file():
            raise PipelineError(f"recipe file {recipe} does not exist; give a path to a .yaml recipe.")
        return path.parent, path.stem
    if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise PipelineError(f"no recipe named {recipe!r}; choose one of: {names} (or recipe=path/to/file.yaml).")
    return RECIPES_DIR, recipe


def _register_schemas() -> None:
    """Typed schemas for the config groups: an unknown key or a wrong type fails at compose time."""
    store = ConfigStore.instance()
    for group, name, node in (
        ("data", "corpus_schema", data.CorpusSpec),
        ("tokenizer", "tokenizer_schema", data.TokenizerSpec),
        ("model", "model_schema", model.ModelSpec),
        ("train", "train_schema", train.TrainSpec),
        ("finetune", "finetune_schema", run.FinetuneSpec),
        ("preference", "preference_schema", run.PreferenceSpec),
        ("generate", "generate_schema", run.GenerateSpec),
        ("eval", "eval_schema", run.EvalSpec),
        ("logger", "logger_schema", run.LoggerSpec),
    ):
        store.store(group=group, name=name, node=node)


def compose_config(overrides: list[str], validate: bool = True):
    """Compose conf/ + a recipe + command-line overrides into one struct (typo-checked) config,
    and build every stage's spec from it, so a bad value fails before any stage runs.
    Returns (config, specs); specs is None when validate=False (for --cfg, to show a bad config)."""
    recipe = DEFAULT_RECIPE
    rest = []
    for arg in overrides:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    recipe_dir, recipe_name = recipe_location(recipe)
    _register_schemas()
    search = f"hydra.searchpath=[file://{CONF_DIR}]"
    try:
        with initialize_config_dir(str(recipe_dir), version_base=None, job_name="pipeline"):
            cfg = compose(recipe_name, overrides=[search, *rest])
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except (HydraException, OmegaConfBaseException) as e:
        message = first_line(e, limit=400)  # Hydra's errors span lines and suggest `+key=` appends
        if "Could not override" in message or "not in struct" in message or "Key '" in message:
            message += " There is no such config key; `pipeline --cfg` lists the valid ones."
        raise PipelineError(f"config error: {message}") from None
    if missing:
        raise PipelineError(
            f"config error: {', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line."
        )
    if cfg.stage not in STAGE_CHOICES:
        raise PipelineError(f"stage={cfg.stage} is unknown; use one of {', '.join(STAGE_CHOICES)}.")
    notes = _explicit_steps_win(cfg, rest, recipe_dir, recipe_name)
    if not validate:
        return cfg, None
    specs = run.build_specs(OmegaConf.to_container(cfg, resolve=True))
    specs.notes = notes
    return cfg, specs


def _explicit_steps_win(cfg, overrides: list[str], recipe_dir: Path, recipe_name: str) -> list[str]:
    """A max_steps set closer to the user (command line > recipe > config group) than the time
    budget decides the steps: the budget is dropped from `cfg`. Set at the same level, both hold
    (the budget, capped by max_steps). Returns a line saying so for each group changed."""
    recipes = _recipe_chain(recipe_dir, recipe_name)
    cli = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    notes = []
    for group in TRAINING_GROUPS:

        def level(key):
            found = (OmegaConf.select(r, key, throw_on_resolution_failure=False) for r in recipes)
            return 2 if key in cli else int(any(v is not None for v in found))

        steps, budget = level(f"{group}.max_steps"), level(f"{group}.time_budget")
        value = OmegaConf.select(cfg, f"{group}.time_budget")
        if value is not None and steps > budget:
            OmegaConf.update(cfg, f"{group}.time_budget", None)
            notes.append(
                f"{group}.max_steps={OmegaConf.select(cfg, f'{group}.max_steps')} from {WHERE[steps]} "
                f"decides the steps, not the {value} time budget from {WHERE[budget]} (set "
                f"{group}.time_budget too to bound the steps by time)"
            )
    return notes


def _recipe_chain(recipe_dir: Path, name: str) -> list:
    """The recipe file and the recipes it builds on (its defaults list), each loaded as written."""
    path = recipe_dir / f"{name}.yaml"
    if not path.is_file():
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file() or name == "config":
            return []
    recipe = OmegaConf.load(path)
    chain = [recipe]
    for entry in recipe.get("defaults", []) or []:
        if isinstance(entry, str) and entry not in ("_self_", "config"):
            chain += _recipe_chain(path.parent, entry)
    return chain


def config_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


def save_run_config(run_dir: Path, cfg, overrides: list[str]) -> None:
    """The composed config and the overrides of this invocation, in <run>/.hydra/."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")

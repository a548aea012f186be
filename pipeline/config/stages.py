"""The stages, in the order `stage=all` runs them: each stage's name and the module that implements it
(pipeline/stages/; the runner imports them, the config only needs the names)."""

STAGE_MODULES = {
    "tokenizer": "pipeline.stages.tokenizer",
    "prepare": "pipeline.stages.prepare",
    "pretrain": "pipeline.stages.pretrain",
    "finetune": "pipeline.stages.finetune",
    "pairs": "pipeline.stages.pairs",
    "preference": "pipeline.stages.preference",
    "generate": "pipeline.stages.generate",
    "eval": "pipeline.stages.answer_quality",  # not `eval`: a module named after a builtin shadows it
}
STAGE_NAMES = tuple(STAGE_MODULES)
STAGE_CHOICES = ("all", *STAGE_NAMES)
PREFERENCE_STAGES = ("pairs", "preference")  # in stage=all only with preference.in_chain=true


def chain(specs) -> tuple[str, ...]:
    """The stages `stage=all` runs."""
    if specs.preference.in_chain:
        return STAGE_NAMES
    return tuple(name for name in STAGE_NAMES if name not in PREFERENCE_STAGES)


def chat_model_stage(specs) -> str:
    """The stage whose model generate and eval use by default: the last chat-training stage of the chain."""
    return "preference" if specs.preference.in_chain else "finetune"

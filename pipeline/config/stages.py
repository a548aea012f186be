"""The stages, in the order `stage=all` runs them: each stage's name and the module that implements it
(pipeline/stages/; the runner imports them, the config only needs the names)."""

STAGE_MODULES = {
    "tokenizer": "pipeline.stages.tokenizer",
    "prepare": "pipeline.stages.prepare",
    "pretrain": "pipeline.stages.pretrain",
    "finetune": "pipeline.stages.finetune",
    "generate": "pipeline.stages.generate",
    "eval": "pipeline.stages.answer_quality",  # not `eval`: a module named after a builtin shadows it
}
STAGE_NAMES = tuple(STAGE_MODULES)
STAGE_CHOICES = ("all", *STAGE_NAMES)

"""pipeline: raw text -> tokenizer -> pretrained LM -> LoRA chat model -> generations."""

__version__ = "0.1.0"

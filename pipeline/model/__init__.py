"""Model components: build from config, load and publish HF dirs, LoRA, the tokenizer contract, inference,
the fine-tuned model's published dirs."""

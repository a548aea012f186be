"""Data: corpus sources, token shards and windows for pretraining, chat conversations for fine-tuning."""

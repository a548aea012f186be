"""Training shared by pretrain and finetune: the loop, the launch strategy, optimizer, checkpoints."""

"""Instruction tuning with PEFT (L2): LoRA, prefix tuning, IA3 or full fine-tuning through TRL's SFTTrainer."""

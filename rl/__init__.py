"""Reinforcement learning from the reward model: PPO (ours), GRPO/RLOO/DPO (TRL), policy evaluation."""

"""One run config per RL algorithm: `PPOConfig` (in `rl.ppo`, beside its loop) and the TRL ones below.

Each run saves exactly its algorithm's settings (a DPO run has no `cliprange`), and `alignloop rl train`'s
flags are generated from these dataclasses (`alignloop.parser.add_config_arguments`): a flag shared by several
algorithms is declared once, and one the chosen algorithm does not have is refused.
Shared YAML files: `configs/rl/*.yaml` are written for PPO but also start GRPO, RLOO and DPO runs
(`round next --algo dpo` reads `configs/rl/default.yaml`), so a YAML key that belongs to *another* RL
algorithm's config is skipped, while a key no RL config has is an error.
Names follow alignloop's vocabulary where the meaning is the same (`kl_coef` is GRPO's and RLOO's `beta`,
a per-token KL penalty, as in PPO); DPO's `beta` keeps TRL's name, because it is not a penalty on tokens but
the temperature of the implicit reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rl.ppo import PPOConfig


@dataclass
class GRPOConfig:
    # --- models ---
    policy: str = field(default="default", metadata={"help": "Model reference to start from."})
    reward_model: str | None = field(default=None, metadata={"help": "Registered reward model."})
    method: str = field(default="lora", metadata={"help": "lora | full (a LoRA adapter, or every weight)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    target_modules: list[str] | str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Tune only these decoder layers (see sft.layers). Default: all."}
    )
    # --- data ---
    prompts: str = field(
        default="workspace", metadata={"help": "'workspace' (train split) or a prompt file."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    # --- rollouts ---
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    num_generations: int = field(
        default=4, metadata={"help": "Completions sampled per prompt (the group a baseline is taken over)."}
    )
    mini_batch_size: int = field(
        default=8,
        metadata={"help": "Completions per optimizer step and process (a multiple of num_generations)."},
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Response length cap."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (also scales log-probs)."}
    )
    # --- objective ---
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty (TRL's beta)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    # --- bookkeeping ---
    seed: int = field(default=0, metadata={"help": "Random seed."})
    name: str | None = field(
        default=None, metadata={"help": "Model version name (default: grpo-run<id> / rloo-run<id>)."}
    )


@dataclass
class RLOOConfig(GRPOConfig):
    """The same settings as GRPO: RLOO differs in its baseline (leave-one-out), not in what it is given."""


@dataclass
class DPOConfig:
    # --- models ---
    policy: str = field(default="default", metadata={"help": "Model reference to start from."})
    method: str = field(default="lora", metadata={"help": "lora | full (a LoRA adapter, or every weight)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    target_modules: list[str] | str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Tune only these decoder layers (see sft.layers). Default: all."}
    )
    # --- training (on the workspace's preference pairs) ---
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    mini_batch_size: int = field(
        default=8, metadata={"help": "Preference pairs per optimizer step (per process)."}
    )
    max_length: int = field(default=512, metadata={"help": "DPO: tokens per prompt + response."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    beta: float = field(
        default=0.1, metadata={"help": "DPO: strength of the pull toward the reference (TRL's beta)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    # --- bookkeeping ---
    seed: int = field(default=0, metadata={"help": "Random seed."})
    name: str | None = field(default=None, metadata={"help": "Model version name (default: dpo-run<id>)."})


@dataclass
class KTOConfig(DPOConfig):
    """The same settings as DPO, on unpaired thumbs up/down from the chat (TRL's KTOTrainer; `beta` is its
    beta). A batch holds at least two rows: KTO estimates its reference point from mismatched pairs in it."""


CONFIGS: dict[str, type] = {
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "rloo": RLOOConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
}
RLConfig = PPOConfig | GRPOConfig | RLOOConfig | DPOConfig | KTOConfig

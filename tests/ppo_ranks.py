"""One PPO step in each process of `accelerate launch --multi_gpu --num_processes 2 tests/ppo_ranks.py OUT`
(tests/test_distributed.py runs it): rank 0 gets short prompts and rank 1 long ones, so under the token budget
they split each minibatch into different numbers of micro-batches. Each rank saves its trainable weights
before and after, its micro-batch counts and its number of backward passes to OUT/rank<N>-<value_model>.pt."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest's tiny model builders; this checkout's packages

import torch  # noqa: E402
from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402

from rl.ppo import PPOTrainer, load_config  # noqa: E402

SHORT = [[{"role": "user", "content": f"Hi {i}?"}] for i in range(4)]
LONG = [
    [{"role": "user", "content": f"Explain item {i}: " + "the sea and the wind, " * 12}] for i in range(4)
]


class RankedPrompts(PPOTrainer):
    """Rank 0 rolls out the short prompts, rank 1 the long ones; counts what the update does."""

    counts: list[int]
    backwards: int

    def step_prompts(self, step: int):
        return (SHORT if self.accelerator.process_index == 0 else LONG)[: self.local_batch]

    def accumulate(self, minibatch):
        self.counts.append(len(self.micro_batches(minibatch)))
        return super().accumulate(minibatch)

    def _backward(self, loss, *, boundary):
        self.backwards += 1
        super()._backward(loss, boundary=boundary)


def main(out: Path) -> None:
    tok = build_tiny_tokenizer()
    for value_model in ("adapter", "shared"):
        config = load_config(
            None,
            steps=1,
            batch_size=8,  # 4 per process, minibatches of 4: one optimizer step per epoch
            mini_batch_size=4,
            ppo_epochs=2,
            max_new_tokens=6,
            max_prompt_length=72,
            micro_batch_tokens=160,  # 4 short rows per pass; 2 long ones
            learning_rate=1e-2,
            missing_eos_penalty=0.0,
            lora_r=4,
            lora_alpha=8,
            value_model=value_model,
            gradient_checkpointing=value_model == "adapter",  # recomputation inside DDP's backward too
            save_every=0,
            target_modules=["q_proj", "v_proj", "down_proj"],
        )
        reward = lambda prompts, completions: [len(c.token_ids) / 6 for c in completions]  # noqa: E731
        trainer = RankedPrompts(
            config, build_tiny_llama(tok, initializer_range=0.1), tok, SHORT + LONG, reward
        )
        trainer.counts, trainer.backwards = [], 0
        start = trainer.ac.trainable_state()
        trainer.train(progress=False)
        rank = trainer.accelerator.process_index
        torch.save(
            {
                "start": start,
                "end": trainer.ac.trainable_state(),
                "counts": trainer.counts,
                "backwards": trainer.backwards,
                "wrapper": type(trainer.model).__name__,
                "find_unused": getattr(trainer.model, "find_unused_parameters", None),
                "replicas_in_sync": trainer.replicas_in_sync,
            },
            out / f"rank{rank}-{value_model}.pt",
        )


if __name__ == "__main__":
    from alignloop.core import distributed

    ok = False
    try:
        main(Path(sys.argv[1]))
        ok = True
    finally:  # leave the process group as the CLI does: a rank exiting with gloo alive can die in SIGABRT
        distributed.finish(ok=ok)

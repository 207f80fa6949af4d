"""Memory bounds for RL: prompts cut to `max_prompt_length`, micro-batches cut to a token budget, RSS measured.

Why: a PPO step's memory is set by its widest forward pass with a graph (activations kept for the backward
pass grow with rows x padded tokens), and on real conversations (HH: p50 91 prompt tokens, max 830) one long
prompt in a minibatch pads every row to its length. Two bounds make the peak independent of the data:
- prompts longer than `max_prompt_length` lose their oldest turns first (`alignloop.core.truncate.fit_prompts`,
  shared with instruction tuning; every cut counted).
- `plan_micro_batches` (`alignloop.core.batching`, shared with reward scoring): a minibatch's rows are
  grouped, rows of similar length together, into micro-batches whose *padded* size (rows x (query width + response width)
  after trimming the padding no row in the group needs) never exceeds `micro_batch_tokens`; gradients
  accumulate over them, weighted so the sum equals the full minibatch's gradient (see
  `rl.ppo.PPOTrainer.losses`). With prompts capped, every row fits the budget, so the activations of any
  forward pass are bounded by the budget whatever the prompt lengths.

Invariants: every micro-batch holds at least one row and, when each row alone fits, at most `budget` padded
tokens; the micro-batches of a minibatch partition its rows.
"""

from __future__ import annotations

import resource

import torch


def row_lengths(query_mask: torch.Tensor, response_mask: torch.Tensor) -> list[tuple[int, int]]:
    return list(zip(query_mask.sum(1).tolist(), response_mask.sum(1).tolist(), strict=True))


def padded_tokens(query_mask: torch.Tensor, response_mask: torch.Tensor) -> int:
    """What a forward pass over these rows really processes: rows x (query width + response width)."""
    return query_mask.shape[0] * (query_mask.shape[1] + response_mask.shape[1])


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()

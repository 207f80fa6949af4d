"""Benchmark: which pair should an annotator label next? Random order against reward-model uncertainty.

Simulated annotation rounds on the real HH-RLHF harmless pairs (`../shared/data/hh_harmless_dev.jsonl`): each
repetition holds out a fifth of the prompts as the test set (a different fifth per repetition), starts from
200 randomly chosen labelled pairs of the rest, and adds 100 pairs per round chosen by each strategy, retraining
after every round, until 1,000 pairs are labelled. Strategies:

- `random`: the next pairs in a random order (no model);
- `margin`: one reward model; the pairs with the smallest |r_a - r_b| (what the queue does for one model);
- `disagreement`: an ensemble; the pairs whose margin r_a - r_b varies most across members;
- `ensemble z`: an ensemble; the smallest |mean margin| / std of the margins across members: pairs near a tie
  *or* in dispute.

The learner is a Bradley-Terry reward head on frozen features: the mean-pooled states of the default reward
model's encoder (all-MiniLM-L6-v2) for each prompt + response, encoded exactly as reward training encodes them
(`reward.data.RewardFormat`, prompt cut from the left, max 256 tokens). The features are computed once, so a
retraining takes milliseconds and a strategy's curve can be repeated over many splits for its standard error;
fine-tuning the encoder in every round (minutes per round on this CPU) would leave a single noisy curve per
strategy. Ensembles are 5 heads fitted on bootstrap resamples of the labelled pairs; `margin` uses one head on
all of them. Prints mean test accuracy +- standard error per strategy and label count, the gain over `random`
at each count, and draws the curves into a PNG.

    .venv/bin/python bench/active_learning.py [--repeats 20] [--out active_learning.png]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
START, STEP, STOP, MEMBERS, MAX_LENGTH = 200, 100, 1000, 5, 256
STRATEGIES = ("random", "margin", "disagreement", "ensemble z")


def features(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled MiniLM states of (prompt, chosen) and (prompt, rejected), as reward training encodes them."""
    from alignloop.core import registry
    from reward.data import RewardFormat
    from reward.score import load_sequence_classifier

    source = registry.ModelSource(ref="minilm", path=registry.encoder_path(), licence="apache-2.0")
    model, tokenizer = load_sequence_classifier(source, pooling="mean")
    fmt = RewardFormat(tokenizer, MAX_LENGTH)
    encoder = model.bert.eval()

    @torch.inference_mode()
    def embed(sequences: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(sequences), encoder.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            out[chunk] = pooled.numpy()
        return out

    chosen = embed([fmt.encode(p.prompt, p.chosen) for p in pairs])
    rejected = embed([fmt.encode(p.prompt, p.rejected) for p in pairs])
    return chosen, rejected


def fit_head(diff: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Bradley-Terry head w: minimise mean -log sigmoid(w . (phi_chosen - phi_rejected)) + l2 |w|^2 (L-BFGS)."""
    x = torch.from_numpy(diff).double()
    w = torch.zeros(x.shape[1], dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -torch.nn.functional.logsigmoid(x @ w).mean() + l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy()


def run_strategy(strategy, diff, pool, test, rng) -> list[float]:
    """Test accuracy after each round. `diff[i]` is chosen minus rejected; the strategies see only the pair,
    never which side was chosen, so they rank by |margin| and spread, which do not depend on the order."""
    order = rng.permutation(pool)
    labelled, unlabelled = list(order[:START]), list(order[START:])
    curve = []
    while True:
        w = fit_head(diff[labelled])
        curve.append(float(np.mean(diff[test] @ w > 0)))
        if len(labelled) >= STOP or not unlabelled:
            return curve
        candidates = np.array(unlabelled)
        if strategy == "random":
            chosen = candidates[:STEP]
        else:
            if strategy == "margin":
                score = np.abs(diff[candidates] @ w)
            else:
                heads = [fit_head(diff[rng.choice(labelled, size=len(labelled))]) for _ in range(MEMBERS)]
                margins = np.stack([diff[candidates] @ h for h in heads])
                spread = margins.std(0, ddof=1)
                score = -spread if strategy == "disagreement" else np.abs(margins.mean(0)) / (spread + 1e-9)
            chosen = candidates[np.argsort(score, kind="stable")[:STEP]]
        taken = set(chosen.tolist())
        labelled += chosen.tolist()
        unlabelled = [i for i in unlabelled if i not in taken]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="splits per strategy (the standard error's n)"
    )
    parser.add_argument("--out", default="active_learning.png")
    parser.add_argument("--json", default=None, help="also write the curves here")
    parser.add_argument("--features", default=None, help="cache the encoder features in this .npz file")
    args = parser.parse_args()

    from reward.data import file_pairs, fold_by_prompt

    pairs, _ = file_pairs(HH)
    index = {id(p): i for i, p in enumerate(pairs)}
    if args.features and Path(args.features).is_file():
        cached = np.load(args.features)
        chosen, rejected = cached["chosen"], cached["rejected"]
    else:
        chosen, rejected = features(pairs)
        if args.features:
            np.savez(args.features, chosen=chosen, rejected=rejected)
    diff = chosen - rejected
    print(f"{len(pairs)} pairs, features {diff.shape[1]}-d; {args.repeats} repetitions", flush=True)

    counts = list(range(START, STOP + 1, STEP))
    curves = {s: [] for s in STRATEGIES}
    for repeat in range(args.repeats):
        fold = repeat % 5 + 1
        train, test = fold_by_prompt(pairs, fold=fold, folds=5, seed=repeat // 5)
        pool = np.array([index[id(p)] for p in train])
        test = np.array([index[id(p)] for p in test])
        for strategy in STRATEGIES:
            curves[strategy].append(run_strategy(strategy, diff, pool, test, np.random.default_rng(repeat)))
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{s} {curves[s][-1][-1]:.3f}" for s in STRATEGIES),
            flush=True,
        )

    table = {s: np.array(c)[:, : len(counts)] for s, c in curves.items()}
    base = table["random"]
    print("\n| labelled pairs | " + " | ".join(STRATEGIES) + " |")
    print("| --- |" + " --- |" * len(STRATEGIES))
    for j, n in enumerate(counts):
        cells = []
        for s in STRATEGIES:
            acc = table[s][:, j]
            cell = f"{acc.mean():.3f} +- {acc.std(ddof=1) / np.sqrt(len(acc)):.3f}"
            if s != "random":  # paired by split and starting set: the gain's own standard error
                gain = acc - base[:, j]
                cell += f" ({gain.mean():+.3f} +- {gain.std(ddof=1) / np.sqrt(len(gain)):.3f})"
            cells.append(cell)
        print(f"| {n} | " + " | ".join(cells) + " |")
    area = {s: table[s].mean() for s in STRATEGIES}
    print(
        "\nmean accuracy over the curve (ratio to random): "
        + ", ".join(f"{s} {a:.4f} ({a / area['random']:.3f}x)" for s, a in area.items())
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in STRATEGIES:
        mean = table[s].mean(0)
        se = table[s].std(0, ddof=1) / np.sqrt(len(table[s]))
        ax.plot(counts, mean, marker="o", label=s)
        ax.fill_between(counts, mean - se, mean + se, alpha=0.2)
    ax.set_xlabel("labelled pairs")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(f"Which pair next? HH harmless, {args.repeats} splits (mean +- s.e.)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"counts": counts, **{s: table[s].tolist() for s in STRATEGIES}})
        )


if __name__ == "__main__":
    main()

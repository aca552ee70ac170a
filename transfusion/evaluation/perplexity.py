"""Perplexity on held-out text, token-weighted over the whole split.

The held-out stream (documents wrapped in BOS ... EOS) is cut into consecutive windows of the model's
context; every token whose predecessor is in the same window and document is predicted once, so the
score is exp(total NLL / total predicted tokens), whatever the window size or number of processes.
torchmetrics' ``Perplexity`` keeps the two sums and adds them across ranks.
"""

from __future__ import annotations

import torch
from torchmetrics.text import Perplexity


def text_windows(stream: torch.Tensor, seq_len: int, bos_id: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive (seq_len,) windows of a token stream, the last one padded; doc ids count BOS tokens."""
    if stream.numel() < 2:
        raise ValueError(f"the held-out text has {stream.numel()} tokens: nothing to score")
    windows = []
    for start in range(0, stream.numel() - 1, seq_len):
        tokens = stream[start:start + seq_len]
        if tokens.numel() < 2:
            break  # a last window of one token predicts nothing
        doc_ids = torch.cumsum((tokens == bos_id).long(), 0)
        pad = seq_len - tokens.numel()
        windows.append({"tokens": torch.cat([tokens, tokens.new_full((pad,), pad_id)]),
                        "doc_ids": torch.cat([doc_ids, doc_ids.new_full((pad,), -1)])})
    return windows


@torch.no_grad()
def update_perplexity(metric: Perplexity, model, tokens: torch.Tensor, doc_ids: torch.Tensor, pad_id: int) -> None:
    """Add one batch of text windows (B, L) to ``metric`` (a Transfusion model: text only, no images)."""
    image_ids = torch.full_like(tokens, -1)
    hidden, _ = model(tokens, doc_ids, image_ids)
    predicted = (doc_ids[:, :-1] == doc_ids[:, 1:]) & (tokens[:, 1:] != pad_id)
    logits = model.lm_head(hidden[:, :-1][predicted]).float()
    metric.update(logits[None], tokens[:, 1:][predicted][None])

"""Dynamic whole-word masking for MLM, done per batch in collate.

A fresh mask each time a batch is built (RoBERTa's dynamic masking) from torch's global RNG, which
the trainer seeds and checkpoints; pass a torch.Generator for a fixed mask (evaluation). The
choice of positions follows Google's create_masked_lm_predictions: per sequence,
round(mlm_probability * maskable tokens) predictions (at most max_predictions), taken word by
word in random order; a masked position becomes [MASK] 80%, a random token 10%, itself 10%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import pad_batch

IGNORE_INDEX = -100  # positions the MLM loss skips


def word_spans(word_start: np.ndarray, maskable: np.ndarray, whole_word: bool = True):
    """The maskable positions of one sequence and the bounds of its words within them: word k is
    positions[bounds[k]:bounds[k + 1]] (a single token each without whole-word masking)."""
    positions = np.flatnonzero(maskable)
    if whole_word and len(positions):
        starts = word_start[positions].astype(bool)
        starts[1:] |= np.diff(positions) > 1  # a special token in between ends the word
        starts[0] = True
        bounds = np.append(np.flatnonzero(starts), len(positions))
    else:
        bounds = np.arange(len(positions) + 1)
    return positions, bounds


def choose_words(lengths: list[int], budget: int, generator: torch.Generator | None) -> list[int]:
    """Words in random order until `budget` tokens are taken; a word that would overshoot is
    skipped (as in Google's code), so the count is exact whenever short words remain."""
    chosen, count = [], 0
    for w in torch.randperm(len(lengths), generator=generator).tolist():
        if count >= budget:
            break
        if count + lengths[w] > budget:
            continue
        chosen.append(w)
        count += lengths[w]
    return chosen


def mask_tokens(
    input_ids: torch.Tensor,
    word_start: torch.Tensor,
    *,
    special_ids,
    mask_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    max_predictions: int = 20,
    whole_word: bool = True,
    generator: torch.Generator | None = None,
):
    """Mask a padded [batch, seq] batch. Returns (masked input_ids, labels): labels hold the
    original id at predicted positions and -100 elsewhere. The inputs are not modified."""
    ids = input_ids.numpy()
    maskable = ~np.isin(ids, list(special_ids))
    starts = word_start.numpy()
    rows, cols = [], []
    for r in range(ids.shape[0]):
        positions, bounds = word_spans(starts[r], maskable[r], whole_word)
        budget = min(max_predictions, max(1, round(len(positions) * mlm_probability))) if len(positions) else 0
        words = choose_words(np.diff(bounds).tolist(), budget, generator)
        picked = np.concatenate([positions[bounds[w] : bounds[w + 1]] for w in words] or [np.zeros(0, np.int64)])
        rows.append(np.full(len(picked), r))
        cols.append(picked)
    rows = torch.from_numpy(np.concatenate(rows)).long()
    cols = torch.from_numpy(np.concatenate(cols)).long()

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[rows, cols] = input_ids[rows, cols]
    masked = input_ids.clone()
    roll = torch.rand(len(rows), generator=generator)
    to_mask, to_random = roll < 0.8, (roll >= 0.8) & (roll < 0.9)  # the other 10% stay unchanged
    masked[rows[to_mask], cols[to_mask]] = mask_id
    masked[rows[to_random], cols[to_random]] = torch.randint(
        vocab_size, (int(to_random.sum()),), generator=generator, dtype=input_ids.dtype
    )
    return masked, labels


@dataclass
class MaskingCollator:
    """Pads rows (input_ids, token_type_ids, word_start, next_sentence_label) and masks them.

    Rows that already carry `labels` (the fixed-mask evaluation set) are only padded.
    Output: input_ids, token_type_ids, attention_mask, labels, next_sentence_label.
    """

    pad_id: int
    mask_id: int
    special_ids: tuple
    vocab_size: int
    mlm_probability: float = 0.15
    max_predictions: int = 20
    whole_word: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer, **settings) -> MaskingCollator:
        return cls(
            pad_id=tokenizer.pad_token_id,
            mask_id=tokenizer.mask_token_id,
            special_ids=tuple(tokenizer.all_special_ids),
            vocab_size=len(tokenizer),
            **settings,
        )

    def __call__(self, rows: list[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(rows, self.pad_id, ("labels", "next_sentence_label"))
        word_start = batch.pop("word_start", None)
        if "labels" not in batch:
            batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"], word_start, generator)
        return batch

    def mask(self, input_ids: torch.Tensor, word_start: torch.Tensor, generator=None):
        return mask_tokens(
            input_ids,
            word_start,
            special_ids=self.special_ids,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            mlm_probability=self.mlm_probability,
            max_predictions=self.max_predictions,
            whole_word=self.whole_word,
            generator=generator,
        )

    def fixed_masks(self, input_ids: list[list[int]], word_start: list[list[int]], seed: int):
        """The same masks on every call for a given seed, row by row (independent of batching):
        (masked input_ids, labels) as lists, for an evaluation set."""
        generator = torch.Generator().manual_seed(seed)
        masked, labels = [], []
        for ids, starts in zip(input_ids, word_start):
            m, lab = self.mask(torch.tensor([ids]), torch.tensor([starts]), generator)
            masked.append(m[0].tolist())
            labels.append(lab[0].tolist())
        return masked, labels

"""Dynamic whole-word masking: statistics on a large real batch, word integrity, special tokens."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.models import load_tokenizer
from bertscale.tasks.masking import IGNORE_INDEX, MaskingCollator, word_spans
from bertscale.tasks.pretraining_data import build_pairs, read_documents

WIKITEXT = Path("/work/shared/data/corpus/wikitext-2-raw/wiki.test.raw")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def rows(tokenizer):
    docs, _ = read_documents([str(WIKITEXT)], "heading", "text")
    cols = build_pairs(docs, tokenizer, 128, 0.1, seed=0)
    return [dict(zip(cols, values)) for values in zip(*cols.values())][:1500]


def collator(tokenizer, **settings):
    return MaskingCollator.from_tokenizer(tokenizer, **settings)


def words_of(row):
    """Positions of each word of a row (a word = a start token and its '##' continuations)."""
    spans, current = [], []
    for pos, start in enumerate(row["word_start"]):
        if start and current:
            spans.append(current)
            current = []
        current.append(pos)
    return spans + [current]


def test_word_spans_group_pieces_and_stop_at_special_tokens():
    # [CLS] play ##ing now [SEP] ##ed x [SEP]
    word_start = np.array([1, 1, 0, 1, 1, 0, 1, 1])
    maskable = np.array([0, 1, 1, 1, 0, 1, 1, 0], dtype=bool)
    positions, bounds = word_spans(word_start, maskable)
    assert [positions[a:b].tolist() for a, b in zip(bounds, bounds[1:])] == [[1, 2], [3], [5], [6]]
    positions, bounds = word_spans(word_start, maskable, whole_word=False)
    assert [positions[a:b].tolist() for a, b in zip(bounds, bounds[1:])] == [[1], [2], [3], [5], [6]]


def test_masking_statistics_on_a_large_batch(tokenizer, rows):
    batch = collator(tokenizer)(rows, generator=torch.Generator().manual_seed(1))
    original = pad_ids(rows, tokenizer.pad_token_id, batch["input_ids"].shape[1])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    chosen = batch["labels"] != IGNORE_INDEX

    share = chosen.sum().item() / (~special).sum().item()
    assert abs(share - 0.15) <= 0.01, share
    assert torch.equal(batch["labels"][chosen], original[chosen])

    masked_in = batch["input_ids"][chosen]
    as_mask = (masked_in == tokenizer.mask_token_id).float().mean().item()
    unchanged = (masked_in == original[chosen]).float().mean().item()
    random_token = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) <= 0.02 and abs(unchanged - 0.1) <= 0.02 and abs(random_token - 0.1) <= 0.02
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])  # nothing else is touched


def test_special_tokens_and_padding_are_never_masked(tokenizer, rows):
    batch = collator(tokenizer)(rows, generator=torch.Generator().manual_seed(2))
    original = pad_ids(rows, tokenizer.pad_token_id, batch["input_ids"].shape[1])
    special = torch.isin(
        original, torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    )
    assert special.sum() > 3 * len(rows)
    assert (batch["labels"][special] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][special], original[special])


@pytest.mark.parametrize("whole_word", [True, False])
def test_whole_word_masking_masks_every_piece_of_a_word_or_none(tokenizer, rows, whole_word):
    rows = rows[:600]
    batch = collator(tokenizer, whole_word=whole_word)(rows, generator=torch.Generator().manual_seed(3))
    chosen = (batch["labels"] != IGNORE_INDEX).numpy()
    split_words = multi_piece_masked = 0
    for i, row in enumerate(rows):
        for span in words_of(row):
            flags = chosen[i, span]
            split_words += bool(flags.any() and not flags.all())
            multi_piece_masked += bool(len(span) > 1 and flags.all())
    if whole_word:
        assert split_words == 0 and multi_piece_masked > 50
    else:
        assert split_words > 50  # token-level masking does split words: the check above can fail


def test_max_predictions_per_seq_is_respected(tokenizer, rows):
    batch = collator(tokenizer, max_predictions=5)(rows, generator=torch.Generator().manual_seed(4))
    per_row = (batch["labels"] != IGNORE_INDEX).sum(1)
    assert per_row.max().item() == 5
    assert (per_row == 5).float().mean() > 0.95


def test_masks_are_new_each_batch_and_follow_the_global_seed(tokenizer, rows):
    collate = collator(tokenizer)
    torch.manual_seed(7)
    first, second = collate(rows[:64]), collate(rows[:64])
    torch.manual_seed(7)
    again = collate(rows[:64])
    assert not torch.equal(first["labels"], second["labels"])
    assert torch.equal(first["labels"], again["labels"]) and torch.equal(first["input_ids"], again["input_ids"])


def test_fixed_masks_repeat_and_rows_with_labels_are_only_padded(tokenizer, rows):
    collate = collator(tokenizer)
    ids = [r["input_ids"] for r in rows[:50]]
    starts = [r["word_start"] for r in rows[:50]]
    masked, labels = collate.fixed_masks(ids, starts, seed=42)
    assert (masked, labels) == collate.fixed_masks(ids, starts, seed=42)
    assert (masked, labels) != collate.fixed_masks(ids, starts, seed=43)

    eval_rows = [
        {
            "input_ids": m,
            "token_type_ids": r["token_type_ids"],
            "labels": lab,
            "next_sentence_label": r["next_sentence_label"],
        }
        for m, lab, r in zip(masked, labels, rows)
    ]
    batch = collate(eval_rows)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "next_sentence_label", "token_type_ids"]
    assert batch["input_ids"][0, : len(masked[0])].tolist() == masked[0]
    assert batch["labels"][0, len(masked[0]) :].eq(IGNORE_INDEX).all()


def test_collate_output_is_what_bert_for_pretraining_takes(tokenizer, rows):
    batch = collator(tokenizer)(rows[:5])
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "next_sentence_label", "token_type_ids"]
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["next_sentence_label"].tolist() == [r["next_sentence_label"] for r in rows[:5]]
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows[:5]]


def pad_ids(rows, pad_id, width):
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    return out

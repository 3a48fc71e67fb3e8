"""SQuAD windows: labels decode back to the answer, windows without it point at [CLS], the
stride overlap and the question cap hold, for an uncased and a cased WordPiece tokenizer."""

import shutil

import pytest
from transformers import BertTokenizer

from bertscale.errors import UserError
from bertscale.models import load_tokenizer
from bertscale.tasks.squad import SquadArgs
from bertscale.tasks.squad_data import DEMO_DIR, load_squad_file
from bertscale.tasks.squad_features import (
    build_features,
    prepare_eval_features,
    prepare_train_features,
    window_settings,
)

WINDOW = dict(max_seq_length=96, doc_stride=24, max_query_length=24)


@pytest.fixture(scope="module")
def uncased():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def cased(tmp_path_factory):
    d = tmp_path_factory.mktemp("cased")
    shutil.copy("/work/shared/data/vocab/bert-base-cased-vocab.txt", d / "vocab.txt")
    return BertTokenizer.from_pretrained(str(d), do_lower_case=False)


@pytest.fixture(scope="module")
def demo():
    return load_squad_file(DEMO_DIR / "train.json", version_2=False, training=True)


def _windows(examples, tokenizer, **window):
    """Train and eval features of the same examples: same windows, eval ones carry the offsets."""
    train = build_features(examples, tokenizer, training=True, **window)
    evals = build_features(examples, tokenizer, training=False, **window)
    assert train["input_ids"][:] == evals["input_ids"][:]
    return train, evals


@pytest.mark.parametrize("which", ["uncased", "cased"])
def test_every_labelled_span_decodes_to_the_answer(which, request, demo):
    tokenizer = request.getfixturevalue(which)
    train, evals = _windows(demo, tokenizer, **WINDOW)
    by_id = {row["id"]: row for row in demo}
    labelled_ids, exact = set(), 0
    for row, ev in zip(train, evals):
        example = by_id[ev["example_id"]]
        text, start_char = example["answers"]["text"][0], example["answers"]["answer_start"][0]
        end_char = start_char + len(text)
        offsets = ev["offset_mapping"]
        context_chars = [o for o in offsets if o[0] >= 0]
        holds_answer = context_chars[0][0] <= start_char and end_char <= context_chars[-1][1]
        s, e = row["start_positions"], row["end_positions"]
        if not holds_answer:
            assert (s, e) == (0, 0)
            continue
        labelled_ids.add(example["id"])
        assert 0 < s <= e < len(row["input_ids"])
        # The span is the smallest run of tokens that covers the answer's characters.
        assert offsets[s][0] <= start_char < offsets[s][1]
        assert offsets[e][0] < end_char <= offsets[e][1]
        decoded = example["context"][offsets[s][0] : offsets[e][1]]
        assert text in decoded
        exact += decoded == text
    # An answer no longer than the 24-token overlap lies whole in some window: each of those is labelled.
    short = {i for i, ex in by_id.items() if len(tokenizer.tokenize(ex["answers"]["text"][0])) <= WINDOW["doc_stride"]}
    assert short <= labelled_ids and len(short) > 0.98 * len(by_id)
    assert exact >= 0.97 * sum(1 for _ in train.filter(lambda r: r["start_positions"] > 0))


def test_hand_worked_windows(uncased):
    # [CLS] where did the cat sit ? [SEP] = 8 tokens; 13 - 8 - 1 [SEP] leaves 4 context tokens a window,
    # and consecutive windows share 2 (the stride): [the cat sat on] [sat on the mat] [the mat .]
    examples = {
        "id": ["q1"],
        "question": ["Where did the cat sit?"],
        "context": ["The cat sat on the mat."],
        "answers": [{"text": ["the mat"], "answer_start": [15]}],
    }
    window = dict(max_seq_length=13, doc_stride=2, max_query_length=64)
    train = prepare_train_features(examples, uncased, **window)
    evals = prepare_eval_features(examples, uncased, **window)
    context = examples["context"][0]
    decoded = [uncased.convert_ids_to_tokens(ids[8:-1]) for ids in train["input_ids"]]
    assert decoded == [["the", "cat", "sat", "on"], ["sat", "on", "the", "mat"], ["the", "mat", "."]]
    assert list(zip(train["start_positions"], train["end_positions"])) == [(0, 0), (10, 11), (8, 9)]
    assert evals["example_id"] == ["q1"] * 3
    offsets = evals["offset_mapping"][1].tolist()
    assert offsets[:8] == [[-1, -1]] * 8 and offsets[-1] == [-1, -1]
    assert [context[a:b] for a, b in offsets[8:-1]] == ["sat", "on", "the", "mat"]
    assert "attention_mask" in train and len(train["input_ids"][2]) == 12  # no padding to max length


def test_stride_overlap_and_lengths(cased, demo):
    window = dict(max_seq_length=80, doc_stride=20, max_query_length=16)
    evals = build_features(demo, cased, training=False, **window)
    ids, offsets, example_ids = evals["input_ids"][:], evals["offset_mapping"][:], evals["example_id"][:]
    follow_ups = 0
    for k in range(len(evals)):
        assert len(ids[k]) <= 80 and len(ids[k]) == len(offsets[k])
        question_tokens = ids[k].index(cased.sep_token_id) - 1
        assert question_tokens <= 16
        if k and example_ids[k] == example_ids[k - 1]:
            previous = [o for o in offsets[k - 1] if o[0] >= 0]
            current = [o for o in offsets[k] if o[0] >= 0]
            assert previous[-20:] == current[:20]
            assert current[20][0] >= previous[-1][1]  # the overlap is exactly the stride
            follow_ups += 1
    assert follow_ups > 100


@pytest.mark.parametrize("max_seq_length", [64, 256])  # the question alone overflows a window / fits in one
def test_long_question_is_cut_at_a_word_boundary(uncased, max_seq_length):
    word = "hippopotamuses"  # hip ##pop ##ota ##mus ##es
    examples = {
        "id": ["q"],
        "question": [" ".join([word] * 20) + " where is it?"],
        "context": ["It is here, in the box."],
        "answers": [{"text": ["in the box"], "answer_start": [12]}],
    }
    # 12 tokens would end inside the third word: the cut keeps two whole words, 10 tokens.
    train = prepare_train_features(examples, uncased, max_seq_length=max_seq_length, doc_stride=8, max_query_length=12)
    tokens = uncased.convert_ids_to_tokens(train["input_ids"][0])
    sep = tokens.index("[SEP]")
    assert tokens[1:sep] == uncased.tokenize(f"{word} {word}") and tokens[sep + 1] == "it"
    assert (train["start_positions"][0], train["end_positions"][0]) != (0, 0)


def test_left_padding_tokenizer_puts_context_first(uncased):
    tokenizer = load_tokenizer("tiny")
    tokenizer.padding_side = "left"
    examples = {
        "id": ["q1"],
        "question": ["Where did the cat sit?"],
        "context": ["The cat sat on the mat."],
        "answers": [{"text": ["the mat"], "answer_start": [15]}],
    }
    train = prepare_train_features(examples, tokenizer, max_seq_length=64, doc_stride=8, max_query_length=64)
    evals = prepare_eval_features(examples, tokenizer, max_seq_length=64, doc_stride=8, max_query_length=64)
    s, e = train["start_positions"][0], train["end_positions"][0]
    offsets = evals["offset_mapping"][0]
    assert (s, e) == (5, 6)  # [CLS] the cat sat on the mat . [SEP] where ...
    assert examples["context"][0][offsets[s][0] : offsets[e][1]] == "the mat"
    assert offsets[9].tolist() == [-1, -1]  # the question comes after the context


def test_impossible_question_points_at_cls(uncased):
    examples = {
        "id": ["q"],
        "question": ["Who?"],
        "context": ["Nobody is named here."],
        "answers": [{"text": [], "answer_start": []}],
    }
    train = prepare_train_features(examples, uncased, max_seq_length=64, doc_stride=8, max_query_length=64)
    assert (train["start_positions"], train["end_positions"]) == ([0], [0])


def test_window_settings_reject_a_stride_without_room(uncased):
    with pytest.raises(UserError, match="--doc-stride 128"):
        window_settings(128, SquadArgs(doc_stride=128, max_query_length=64), uncased)
    assert window_settings(384, SquadArgs(), uncased) == {
        "max_seq_length": 384,
        "doc_stride": 128,
        "max_query_length": 64,
    }


def test_features_from_a_file_are_cached(uncased, demo):
    first = build_features(demo, uncased, training=True, **WINDOW)
    again = build_features(demo, uncased, training=True, **WINDOW)
    assert first.cache_files and first.cache_files == again.cache_files


def test_windows_cache_key_follows_tokenizer_settings_and_split(uncased, cased, demo):
    """The windows are cached under a key of our own: it must change with anything that changes
    the windows (else a stale cache would be reused), and stay put otherwise (else no cache hit)."""
    from bertscale.tasks.squad_features import windows_fingerprint

    key = windows_fingerprint(demo, uncased, True, WINDOW)
    assert key == windows_fingerprint(demo, load_tokenizer("tiny"), True, dict(WINDOW))
    others = {
        windows_fingerprint(demo, cased, True, WINDOW),
        windows_fingerprint(demo, uncased, False, WINDOW),
        windows_fingerprint(demo, uncased, True, {**WINDOW, "doc_stride": 16}),
        windows_fingerprint(demo.select(range(5)), uncased, True, WINDOW),
    }
    assert key not in others and len(others) == 4
    # and datasets really serves the cached windows under it
    first = build_features(demo, uncased, training=True, **WINDOW)
    again = build_features(demo, load_tokenizer("tiny"), training=True, **WINDOW)
    assert first.cache_files == again.cache_files and key in first.cache_files[0]["filename"]

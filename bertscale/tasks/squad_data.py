"""SQuAD examples as a datasets.Dataset with the hub's columns (id, title, context, question,
answers={text, answer_start}), from a local SQuAD-format JSON file or from the hub.

Local files are parsed and validated in python first, so a bad file ends with one message that
names the file and the record; the validated rows are then written, as one Arrow table, to the
datasets cache under a digest of the file, so the tokenisation map that follows is cached by
datasets too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from pathlib import Path

from .. import hub
from ..errors import UserError

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "squad_demo"
# Bump when the rows built from a file change, so cached copies of older rows are not reused.
_ROWS_VERSION = "1"


def example_features():
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
        }
    )


def load_examples(data, split: str, version_2: bool):
    """Examples of one split ('train' or 'validation') by the data flags: the split's file if given,
    else the hub dataset (--dataset, default squad / squad_v2). None for 'validation' when only a
    train file was given (a local run without an eval file skips evaluation)."""
    path = data.train_file if split == "train" else data.eval_file
    flag = "--train-file" if split == "train" else "--eval-file"
    if path:
        return load_squad_file(path, version_2=version_2, training=split == "train", flag=flag)
    if split == "validation" and data.train_file and not data.dataset:
        return None
    return load_hub_split(data.dataset or ("squad_v2" if version_2 else "squad"), data.dataset_config, split)


def load_squad_file(path, *, version_2: bool, training: bool, flag: str = ""):
    source = f"{flag} {path}".strip()
    raw = _read_bytes(path, source)
    columns = parse_squad(raw, source=source, version_2=version_2, training=training)
    digest = hashlib.sha256(raw).hexdigest()[:32]
    return _cached_rows(columns, f"squad-rows{_ROWS_VERSION}-{digest}-v{int(version_2)}-t{int(training)}")


def _cached_rows(columns: dict, name: str):
    """The rows as a memory-mapped Dataset in the datasets cache. Built as one Arrow table
    (Dataset.from_generator encodes row by row: 2 s for a 12k-question file, against 0.02 s).
    The file name holds the digest of the source, so it doubles as the dataset's fingerprint and
    the tokenisation map over it is cached; ranks that come second find the file ready."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    features = example_features()
    path = Path(datasets.config.HF_DATASETS_CACHE) / "bertscale" / f"{name}.arrow"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            writer.write_table(pa.Table.from_pydict(columns, schema=features.arrow_schema))
            writer.finalize()
        os.replace(tmp, path)  # atomic: a run killed mid-write leaves no half file behind
    return datasets.Dataset.from_file(str(path))


def _read_bytes(path, source: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{source}: no such file. Pass a SQuAD-format .json or .json.gz file.")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{source}: not a readable gzip file ({e}).") from None
    return data


def parse_squad(raw: bytes, *, source: str, version_2: bool, training: bool) -> dict[str, list]:
    """Validate SQuAD JSON and flatten it to columns. Structural problems raise UserError; in
    training files, answers whose answer_start does not point at their text are skipped and counted
    (a question left with no usable answer is skipped)."""
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not UTF-8 text ({e}).") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(
            f"{source}: not SQuAD format; expected an object "
            '{"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [...]}]}]}.'
        )

    columns = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    seen, bad_answers, skipped = set(), 0, 0
    for ai, article in enumerate(doc["data"]):
        where = f"data[{ai}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise UserError(f"{source}: {where} has no 'paragraphs' list.")
        title = str(article.get("title", ""))
        for pi, paragraph in enumerate(paragraphs):
            where = f"data[{ai}].paragraphs[{pi}]"
            context = _field(paragraph, "context", str, source, where)
            for qi, qa in enumerate(_field(paragraph, "qas", list, source, where)):
                qa_where = f"{where}.qas[{qi}]"
                qid = str(_field(qa, "id", (str, int), source, qa_where))
                qa_where = f"question id {qid!r} ({qa_where})"
                question = _field(qa, "question", str, source, qa_where)
                answers = _field(qa, "answers", list, source, qa_where)
                if qid in seen:
                    raise UserError(f"{source}: {qa_where}: the id is used by an earlier question; ids must be unique.")
                seen.add(qid)
                texts, starts = _answers(qa, answers, context, version_2, source, qa_where)
                if training and texts:
                    good = [i for i, (t, s) in enumerate(zip(texts, starts)) if context[s : s + len(t)] == t]
                    bad_answers += len(texts) - len(good)
                    if not good:
                        skipped += 1
                        continue
                    texts, starts = [texts[i] for i in good], [starts[i] for i in good]
                columns["id"].append(qid)
                columns["title"].append(title)
                columns["context"].append(context)
                columns["question"].append(question)
                columns["answers"].append({"text": texts, "answer_start": starts})

    if bad_answers:
        warnings.warn(
            f"{source}: {bad_answers} answers have an answer_start that does not point at their "
            f"text and were ignored; {skipped} questions were skipped for lack of a usable answer.",
            stacklevel=2,
        )
    if not columns["id"]:
        what = "usable training question" if training else "question"
        reason = f" ({skipped} skipped: no answer_start matches its answer text)" if skipped else ""
        raise UserError(f"{source}: no {what} in the file{reason}.")
    return columns


def _field(record, key, kind, source, where):
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"{source}: {where} has no '{key}'.")
    value = record[key]
    if not isinstance(value, kind):
        raise UserError(f"{source}: {where}: '{key}' should be {_kind_name(kind)}, not {type(value).__name__}.")
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", list: "a list", int: "an integer"}
    return " or ".join(names[k] for k in kind) if isinstance(kind, tuple) else names[kind]


def _answers(qa, answers, context, version_2, source, where) -> tuple[list[str], list[int]]:
    # v2 impossible questions have no reference; plausible_answers stay out of the references.
    if version_2 and qa.get("is_impossible"):
        return [], []
    if not answers and not version_2:
        hint = " It looks like SQuAD v2.0: use --task squad_v2." if qa.get("is_impossible") else ""
        raise UserError(f"{source}: {where} has an empty 'answers' list; SQuAD v1.1 needs at least one.{hint}")
    texts, starts = [], []
    for k, ans in enumerate(answers):
        text = _field(ans, "text", str, source, f"{where}.answers[{k}]")
        start = _field(ans, "answer_start", int, source, f"{where}.answers[{k}]")
        if not 0 <= start <= len(context):
            raise UserError(
                f"{source}: {where}.answers[{k}]: answer_start {start} is outside the context (length {len(context)})."
            )
        texts.append(text)
        starts.append(start)
    return texts, starts


def load_hub_split(name: str, config: str | None, split: str):
    examples = hub.load_split(
        name,
        config,
        split,
        hint="Without network, pass local SQuAD JSON with "
        f"--train-file/--eval-file (a small demo: {DEMO_DIR}/train.json, dev.json).",
    )
    hub.require_columns(examples, ("id", "context", "question", "answers"), name, split, "SQuAD")
    return examples

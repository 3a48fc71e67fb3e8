"""Ask a trained SQuAD model a few held-out questions through `bertscale predict`, as a user would,
and print each answer beside the reference. Used by examples/demo.sh:

    python examples/demo_questions.py MODEL_DIR DEV_JSON [HOW_MANY]
"""

import json
import subprocess
import sys
from pathlib import Path


def questions(dev_json: Path, how_many: int):
    """The first question of the first `how_many` articles: different topics, all held out."""
    for article in json.loads(dev_json.read_text())["data"][:how_many]:
        paragraph = article["paragraphs"][0]
        qa = paragraph["qas"][0]
        yield qa["question"], paragraph["context"], qa["answers"][0]["text"]


def main(model: str, dev_json: str, how_many: str = "3") -> None:
    bertscale = Path(sys.executable).with_name("bertscale")
    for question, context, reference in questions(Path(dev_json), int(how_many)):
        out = subprocess.run(
            [str(bertscale), "predict", "--model", model, "--question", question, "--context", context],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(out.stderr)
        print(f"  Q: {question}\n     {out.stdout.strip()}   (reference: {reference!r})", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

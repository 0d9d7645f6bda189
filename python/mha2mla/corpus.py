"""The text corpus that calibration and fine-tuning read: finding its files,
the project's default corpus, and reading documents out of text and jsonl
files (jsonl: one JSON object a line, its "text" field a document)."""
import glob
import json
import os
import random
from typing import Iterator, List, Sequence

from .shared_data import shared_path

TEXT_EXTENSIONS = ("txt", "jsonl", "raw", "md")  # what a folder given as data contributes


def default_corpus() -> str:
    """../shared/data/corpus beside the project checkout ($MHA2MLA_DATA/corpus)."""
    return shared_path("corpus")


def corpus_files(paths: Sequence[str], role: str = "text") -> List[str]:
    """The text files of `paths` (files, or folders searched recursively for
    .txt/.jsonl/.raw/.md), sorted, each once. role names the data in the
    errors ("training", "calibration"): FileNotFoundError for a path that
    does not exist or folders without text files."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for ext in TEXT_EXTENSIONS:
                files += glob.glob(os.path.join(p, "**", f"*.{ext}"), recursive=True)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{role} data not found: {p}")
    files = sorted(set(files))
    if not files:
        raise FileNotFoundError(f"no {role} data: no .txt/.jsonl/.raw/.md files under {list(paths)}")
    return files


def jsonl_texts(lines: Sequence[str]) -> List[str]:
    """The "text" fields of JSON lines; lines that are not a JSON object (a
    line cut by a read window, a blank line) are skipped."""
    texts = []
    for line in lines:
        try:
            texts.append(str(json.loads(line).get("text", "")))
        except (json.JSONDecodeError, AttributeError):
            continue
    return texts


def documents(path: str) -> Iterator[str]:
    """The documents of one file: a jsonl file's "text" fields, or a text
    file's whole content as one document (undecodable bytes dropped). A
    jsonl line that is not a JSON object raises ValueError naming the file
    and line."""
    with open(path, encoding="utf-8", errors="ignore") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        yield text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield str(json.loads(line).get("text", ""))
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}:{number}: not a JSON object with a \"text\" field") from None


def read_window(path: str, rng: random.Random, n_chars: int) -> str:
    """About n_chars bytes of text from a random place of one file; of a
    jsonl file, the "text" fields of the whole lines inside the window."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(rng.randrange(0, max(1, size - n_chars)))
        data = f.read(n_chars).decode("utf-8", errors="ignore")
    if path.endswith(".jsonl"):  # the window's first and last lines are cut
        return "\n".join(jsonl_texts(data.split("\n")[1:-1]))
    return data

"""Reading YAML (or JSON) documents from files, directories and standard input.

`load_paths(["bookinfo.yaml", "dir/", "-"])` returns `Document`s numbered 1, 2, ... within each file
(every `---`-separated document counts, empty ones included, so the numbers match what a reader counts).
A directory contributes its `*.yaml`, `*.yml` and `*.json` files in name order (not recursively).
A file that is not valid YAML raises `ValidationError` naming the file, the document and the line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from mesh.api.errors import ApiError, BadRequest, FieldError, ValidationError
from mesh.api.validate import Document

SUFFIXES = (".yaml", ".yml", ".json")


def parse_text(text: str, source: str) -> list[Document]:
    """Split `text` into documents; empty documents are dropped but keep their number."""
    docs: list[Document] = []
    index = 0
    try:
        for index, body in enumerate(yaml.safe_load_all(text), start=1):
            if body is not None:
                docs.append(Document(source, index, body))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValidationError([FieldError("", f"not valid YAML{where}: {problem}", source, index + 1)]) from exc
    return docs


def files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    return [path]


def load_paths(paths: Sequence[str], stdin: IO[str] | None = None) -> list[Document]:
    """Every document of every path ('-' is standard input), in order."""
    docs: list[Document] = []
    errors: list[FieldError] = []
    for name in paths:
        if name == "-":
            texts = [("-", (stdin or sys.stdin).read())]
        else:
            path = Path(name)
            if not path.exists():
                raise ApiError(f"{name}: no such file or directory")
            try:
                texts = [(str(p), p.read_text()) for p in files_of(path)]
            except (OSError, UnicodeDecodeError) as exc:
                raise ApiError(f"{name}: cannot read: {exc}") from exc
            if not texts:
                raise ApiError(f"{name}: no .yaml, .yml or .json files in this directory")
        for source, text in texts:
            try:
                docs.extend(parse_text(text, source))
            except ValidationError as exc:
                errors.extend(exc.errors)
    if errors:
        raise ValidationError(errors)
    return docs


def documents_from_json(items: Any) -> list[Document]:
    """Documents as the apply API carries them: `[{"source": ..., "index": N, "body": {...}}, ...]`."""
    if not isinstance(items, list):
        raise ValidationError([FieldError("", "the request must carry a list of documents")])
    docs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "body" not in item:
            raise ValidationError([FieldError(f"documents[{i}]", "must be {source, index, body}")])
        docs.append(Document(str(item.get("source") or "-"), _index(item.get("index"), i), item["body"]))
    return docs


def _index(value: Any, i: int) -> int:
    """A document's number in its file: a positive integer (or its digits), by default its place + 1."""
    if value is None:
        return i + 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"documents[{i}].index must be a positive integer (the document's number in its file), "
                         f"not {value!r}")
    return value


def documents_to_json(docs: Sequence[Document]) -> list[dict[str, Any]]:
    return [{"source": d.source, "index": d.index, "body": d.body} for d in docs]

"""Training examples from a CSV or JSONL file: parsed rows, and a precise error per bad row.

A row needs the example's text (`input_text`, or `text`) and its `intent`;
`output_text` (the response the user wanted) and `rating` (1-5) are
optional. Rows are checked with the trainer's own validators, so what the
preview accepts is what `CustomModelTrainer.add_training_example` stores.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the file (CSV: the header is line 1)
    input_text: str
    intent: str
    output_text: str = ""
    rating: int | None = None


@dataclass
class Parsed:
    rows: list[Row] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, what is wrong)


def _row(line: int, record: dict[str, Any], max_chars: int) -> Row:
    from client.assistant.trainer import validate_intent  # imports torch: not at window open

    text = record.get("input_text", record.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no input_text (the example's text)")
    if len(text) > max_chars:
        raise ValueError(f"input_text has {len(text)} characters; the limit is {max_chars}")
    intent = record.get("intent")
    if intent is None or intent == "":
        context = record.get("context")
        intent = context.get("intent") if isinstance(context, dict) else None
    if intent is None or intent == "":
        raise ValueError("no intent")
    intent = validate_intent(intent.strip() if isinstance(intent, str) else intent)
    output = record.get("output_text") or ""
    if not isinstance(output, str):
        raise ValueError("output_text must be text")
    raw = record.get("rating")
    rating: int | None = None
    if raw not in (None, ""):
        try:
            rating = int(str(raw))
        except ValueError:
            raise ValueError(f"rating {raw!r} is not a whole number from 1 to 5") from None
        if not 1 <= rating <= 5 or isinstance(raw, float | bool):
            raise ValueError(f"rating {raw!r} is not a whole number from 1 to 5")
    return Row(line, text, intent, output, rating)


def parse_examples(path: Path, max_chars: int = 10_000) -> Parsed:
    """Every row of a .csv or .jsonl/.json file: the good ones, and an error per bad one."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".ndjson"):
        raise ValueError(f"{path.name}: choose a .csv or .jsonl file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path.name} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    out = Parsed()
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        names = set(reader.fieldnames or ())
        if not names & {"input_text", "text"} or "intent" not in names:
            raise ValueError(
                f"{path.name}: the first line must name the columns, with input_text (or text) "
                f"and intent; it names {', '.join(sorted(names)) or 'none'}"
            )
        for record in reader:
            line = reader.line_num
            if None in record:
                out.errors.append((line, "more fields than the header names"))
                continue
            try:
                out.rows.append(_row(line, dict(record), max_chars))
            except ValueError as exc:
                out.errors.append((line, str(exc)))
        return out
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.errors.append((line, f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            out.errors.append((line, "not a JSON object"))
            continue
        try:
            out.rows.append(_row(line, record, max_chars))
        except ValueError as exc:
            out.errors.append((line, str(exc)))
    return out

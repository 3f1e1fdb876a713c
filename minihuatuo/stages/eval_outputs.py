"""The outputs file of `minihuatuo eval` (paper §4.1's model answers): reading it, matching its records
to the exam's items, and the URL of the server that generates them.

Ours is {"id", "output"} per line; the official evaluation script writes the data's items back with an
"output" field added, ids or not. `match_outputs` matches by id, else by position, else by question
text, so either file is scored as it is (notes/eval.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from minihuatuo.services.formats import MCQItem
from minihuatuo.services.records import FormatError, read_records


def read_outputs(path) -> dict[str, str]:
    """{"id", "output"} lines (JSONL or a JSON list) -> {id: output}."""
    out, lines = {}, {}
    for rec in read_records(path):
        i, o = rec.data.get("id"), rec.data.get("output")
        if not isinstance(i, (str, int)) or isinstance(i, bool):
            raise FormatError(path, rec.line, "id", "missing or not a string")
        if not isinstance(o, str):
            raise FormatError(path, rec.line, "output", "missing or not a string")
        if str(i) in out:
            raise FormatError(path, rec.line, "id", f"duplicate id {str(i)!r} (first at line {lines[str(i)]})")
        out[str(i)], lines[str(i)] = o, rec.line
    return out


QUESTION_FIELDS = ("question", "input", "prompt")  # where an id-less output record may carry its question


@dataclass
class OutputRecord:
    line: int
    id: str | None  # None: the record carries no id
    output: str
    question: str | None  # the first string among QUESTION_FIELDS, else None


def read_output_records(path) -> list[OutputRecord]:
    """Every record of an outputs file, with or without an id: ours ({"id", "output"}) or the official
    eval.py's (the data's items, each with an "output" field added; a list or {source: [items]})."""
    out = []
    for rec in read_records(path):
        i, o = rec.data.get("id"), rec.data.get("output")
        if i is not None and (not isinstance(i, (str, int)) or isinstance(i, bool)):
            raise FormatError(path, rec.line, "id", "not a string or an integer")
        if not isinstance(o, str):
            raise FormatError(path, rec.line, "output", "missing or not a string")
        q = next((rec.data[f] for f in QUESTION_FIELDS if isinstance(rec.data.get(f), str)), None)
        out.append(OutputRecord(rec.line, None if i is None else str(i), o, q))
    return out


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())  # a file rewritten with other line breaks still matches


def match_outputs(items: list[MCQItem], records: list[OutputRecord], path="outputs") -> tuple[dict[str, str], str]:
    """({item id: output}, how) where how is the first rule that works:
      "id":       every record has an id and some match the data's ids (outputs of unknown ids are kept,
                  and reported by `score` as unmatched);
      "position": as many records as items, record k for item k (refused when a record's question
                  field disagrees with its item's question);
      "question": every record's "question" / "input" / "prompt" equals the question of one item
                  (items asked twice are matched in order).
    ValueError (one line) when none does."""
    if not records:
        return {}, "id"
    known = {it.id for it in items}
    if all(r.id is not None for r in records) and any(r.id in known for r in records):
        out, lines = {}, {}
        for r in records:
            if r.id in out:
                raise FormatError(path, r.line, "id", f"duplicate id {r.id!r} (first at line {lines[r.id]})")
            out[r.id], lines[r.id] = r.output, r.line
        return out, "id"
    if len(records) == len(items) and all(r.question is None or _same_text(r.question, it.question)
                                          for r, it in zip(records, items)):
        return {it.id: r.output for it, r in zip(items, records)}, "position"
    waiting: dict[str, list[str]] = {}  # question -> ids of items not matched yet, in order
    for it in items:
        waiting.setdefault(" ".join(it.question.split()), []).append(it.id)
    out, unmatched = {}, 0
    for r in records:
        ids = waiting.get(" ".join(r.question.split())) if r.question is not None else None
        if ids:
            out[ids.pop(0)] = r.output
        else:
            unmatched += 1
    if not unmatched:
        return out, "question"
    with_ids = sum(r.id is not None for r in records)
    raise ValueError(f"{path}: cannot match its {len(records)} outputs to the {len(items)} items of the data: "
                     f"{with_ids} carry an id but none is an item's id, the counts differ (or questions disagree), "
                     f"and {unmatched} carry no {'/'.join(QUESTION_FIELDS)} field equal to an item's question")


def endpoint_base_url(url: str) -> str:
    """The base URL an OpenAI client wants (up to /v1) from what a user may type: "http://h:8000",
    "http://h:8000/v1" or the full "http://h:8000/v1/chat/completions"."""
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        url = url.removesuffix(suffix)
    return url if url.split("://", 1)[-1].count("/") else url + "/v1"

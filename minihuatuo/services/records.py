"""Reading and writing JSON / JSONL records, with line numbers for errors and crash-safe output.

Every data file of the project goes through here (formats.py gives the records their meaning):
- `read_records`: the objects of a JSON list, a JSONL file, or a JSON object of items ({key: item}
  or {group: [items]}), each with the line it starts on, so that bad input can be named by file,
  line and field (`FormatError`, a ValueError);
- `write_records`: a whole file, written to a temporary name and renamed (never half a file);
- `JsonlAppender`: append-only output for expensive stages, one flushed line per record, so a crash
  loses at most the line being written and a rerun can skip what is done.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path


class FormatError(ValueError):
    """Bad input: the message names the file, the line and (when known) the field."""

    def __init__(self, path, line: int | None, field_name: str | None, message: str):
        where = f"{path}" + (f": line {line}" if line is not None else "")
        super().__init__(f"{where}: " + (f"field {field_name!r}: " if field_name else "") + message)


@dataclass
class Record:
    data: dict
    line: int  # 1-based line where the record starts
    key: str | None = None  # {key: item} files: the item's key
    group: str | None = None  # {group: [items]} files: the group name


_WS = re.compile(r"\s*")


class _Scanner:
    """Walks a JSON document with `raw_decode`, so each item of a list knows its line number
    (json.load alone would lose them, and errors must name the line of the bad item)."""

    def __init__(self, path, text: str):
        self.path, self.text, self.dec = path, text, json.JSONDecoder()
        self._pos, self._line = 0, 1

    def line(self, i: int) -> int:  # incremental: scanning forward costs O(file) in total
        if i < self._pos:
            self._pos, self._line = 0, 1
        self._line += self.text.count("\n", self._pos, i)
        self._pos = i
        return self._line

    def skip(self, i: int) -> int:
        return _WS.match(self.text, i).end()

    def value(self, i: int):
        try:
            return self.dec.raw_decode(self.text, i)
        except json.JSONDecodeError as e:
            raise FormatError(self.path, e.lineno, None, f"invalid JSON ({e.msg}, column {e.colno})") from None

    def expect(self, i: int, chars: str, what: str) -> int:
        i = self.skip(i)
        if i >= len(self.text) or self.text[i] not in chars:
            raise FormatError(self.path, self.line(min(i, len(self.text))), None, f"invalid JSON (expected {what})")
        return i

    def container(self, i: int, keyed: bool, member) -> int:
        """Walk the list (or object, `keyed`) opening at i: member(key, start) parses each value and
        returns where it ends. Returns the index after the closing bracket."""
        close = "}" if keyed else "]"
        i = self.skip(i + 1)
        if self.text.startswith(close, i):
            return i + 1
        while True:
            i, key = self.skip(i), None
            if keyed:
                line = self.line(i)
                key, i = self.value(i)
                if not isinstance(key, str):
                    raise FormatError(self.path, line, None, "invalid JSON (expected a key)")
                i = self.skip(self.expect(i, ":", "':'") + 1)
            i = self.expect(member(key, i), "," + close, f"',' or '{close}'")
            if self.text[i] == close:
                return i + 1
            i += 1

    def item(self, i: int, out: list, key=None, group=None) -> int:
        line = self.line(i)
        obj, end = self.value(i)
        if not isinstance(obj, dict):
            hint = " (a file holding one item must be a list)" if key is not None else ""
            raise FormatError(self.path, line, key, f"expected a JSON object, got {type(obj).__name__}{hint}")
        out.append(Record(obj, line, key, group))
        return end

    def document(self) -> list[Record]:
        """A list of items, {group: [items]} (the official evaluation file) or {key: item} (PubMedQA)."""
        out: list[Record] = []
        i = self.skip(0)
        if i >= len(self.text):
            return out
        if self.text[i] == "[":
            i = self.container(i, False, lambda _, j: self.item(j, out))
        elif self.text[i] == "{":
            _, end = self.value(i)  # is the object the whole file? (not JSONL named *.json)
            if self.skip(end) != len(self.text):
                i = end
            else:
                def member(key, j):
                    if self.text.startswith("[", j):
                        return self.container(j, False, lambda _, m: self.item(m, out, group=key))
                    return self.item(j, out, key=key)

                i = self.container(i, True, member)
        else:
            raise FormatError(self.path, self.line(i), None, "expected a JSON list of objects (or JSONL)")
        if self.skip(i) != len(self.text):
            raise FormatError(self.path, self.line(self.skip(i)), None, "invalid JSON (extra data after the "
                              "document; a JSONL file must be named *.jsonl)")
        return out


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix in (".jsonl", ".ndjson"):
        return True
    if path.suffix == ".json":
        return False
    try:  # unknown suffix: a document that is one JSON value is JSON, several objects are JSONL
        json.loads(text)
        return False
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"


def read_records(path) -> list[Record]:
    """The objects of a JSON list, a JSONL file or a JSON object of items, with their line numbers."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerates a byte-order mark
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1  # e.start counts from the file's first byte
        raise FormatError(path, line, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not _is_jsonl(path, text):
        return _Scanner(path, text).document()
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, n, None, f"invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise FormatError(path, n, None, f"expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, n))
    return out


# ---------------------------------------------------------------------------------------------------
# writing


def write_records(path, records: list[dict]) -> None:
    """JSONL for *.jsonl / *.ndjson, else a JSON list (indented). Written to a temporary file and
    renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix in (".jsonl", ".ndjson"):
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=2)
            f.write("\n")
    os.replace(tmp, path)


class JsonlAppender:
    """Append-only JSONL output for expensive stages: one line per record, flushed at once.

        with JsonlAppender(path) as out:
            for r in work_not_done_yet:
                out.write(r)

    A line cut short by a crash (no final newline) is removed on open, with a note on stderr:
    it is a record that was never completely written, and the rerun redoes it. `durable=True` also
    fsyncs each record, so that after a power cut or kill -9 a finished record is on disk (search:
    each line is minutes of LLM calls)."""

    def __init__(self, path, durable: bool = False):
        self.path = Path(path)
        self.durable = durable
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        self._f = open(self.path, "a", encoding="utf-8")

    def _drop_partial_line(self):
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                print(f"{self.path}: removed an incomplete last line ({len(data) - keep} bytes) left by an "
                      "interrupted run", file=sys.stderr)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.durable:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

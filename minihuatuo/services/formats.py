"""Data formats: exam MCQ sets and the official HuatuoGPT-o1 release formats, as JSON or JSONL.

Three kinds of records (paper §2.1, §4.1):

- `MCQItem`: one closed-set exam question. Read from any of the common dataset layouts, detected
  per item:
    MedQA-USMLE   {"question", "options": {"A": ..}, "answer_idx": "A", "answer": text}
    MedMCQA       {"question", "opa", "opb", "opc", "opd", "cop"}   cop: see `read_mcq`
    PubMedQA      {"question" | "QUESTION", "context" | "CONTEXTS", "final_decision": yes/no/maybe}
                  -> options A "yes", B "no", C "maybe"
    MMLU-Pro/GPQA {"question", "options": [..], "answer_index": 0-based int | "answer": letter}
  A file is a JSON list, JSONL, or a JSON object: {source: [items]} (the official evaluation file)
  or {id: item} (the PubMedQA release, keyed by PMID). Every item gets a `source` tag (its own
  "source" field, else the group key, else the caller's default, else the file name) and an `id`
  (its own "id" field, else the key, else "file:line").
  MCQs are written in one canonical layout (MedQA style plus "id" and "source").
- `VerifiableProblem` {"Open-ended Verifiable Question": x, "Ground-True Answer": y*} and
- `SFTExample` {"Question", "Complex_CoT", "Response"}: the official release formats. They round
  trip unchanged: unknown fields and the original key order are kept, so files move between this
  project and the official scripts.

Bad input raises `records.FormatError` (a ValueError) naming file, line and field; reading and
writing the files themselves (line numbers, atomic writes, append-only output) is records.py.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from minihuatuo.services.records import FormatError, Record, read_records, write_records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
X_KEY, Y_KEY = "Open-ended Verifiable Question", "Ground-True Answer"  # official field names
SFT_KEYS = ("Question", "Complex_CoT", "Response")


# ---------------------------------------------------------------------------------------------------
# the three kinds of records


@dataclass
class MCQItem:
    """One closed-set exam question, whatever file format it came from."""

    id: str
    question: str
    options: dict[str, str]  # {"A": "...", "B": "...", ...}
    answer_idx: str  # the correct option's letter
    source: str  # e.g. "MedQA", "MedMCQA", "PubMedQA", "MMLU-Pro", "GPQA"
    extra: dict = field(default_factory=dict)  # fields carried through unchanged (context, ...)

    @property
    def answer(self) -> str:
        return self.options[self.answer_idx]

    @property
    def context(self) -> str:
        """PubMedQA's abstract as plain text ("" when the item has none)."""
        c = self.extra.get("context", self.extra.get("CONTEXTS", ""))
        if isinstance(c, dict):  # Hugging Face pubmed_qa: {"contexts": [...], "labels": [...], ...}
            c = c.get("contexts", "")
        if isinstance(c, list):
            c = "\n".join(str(s) for s in c)
        return c if isinstance(c, str) else ""

    def prompt_fields(self) -> dict[str, str]:
        """The item as a prompt shows it, for `replies.render`: {context} ("Context: <abstract>" and a
        blank line, or ""), {question} as written, {options} (one "A. text" line per option)."""
        return {"context": f"Context: {self.context}\n\n" if self.context else "", "question": self.question,
                "options": "\n".join(f"{k}. {v}" for k, v in self.options.items())}

    def to_record(self) -> dict:
        """Canonical layout (MedQA style): read back as the same item."""
        rec = {"id": self.id, "source": self.source, "question": self.question, "options": dict(self.options),
               "answer_idx": self.answer_idx, "answer": self.answer}
        for k, v in self.extra.items():
            rec.setdefault(k, v)
        return rec


def _ordered(values: dict, key_order: tuple[str, ...]) -> dict:
    order = [k for k in key_order if k in values] + [k for k in values if k not in key_order]
    return {k: values[k] for k in order}


@dataclass
class VerifiableProblem:
    """Official release format: {"Open-ended Verifiable Question": x, "Ground-True Answer": y_star}."""

    x: str
    y_star: str
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = ()  # the file's key order, so a record is written back unchanged

    def to_record(self) -> dict:
        return _ordered({X_KEY: self.x, Y_KEY: self.y_star, **self.extra}, self.key_order)


@dataclass
class SFTExample:
    """Official release format: {"Question", "Complex_CoT", "Response"}."""

    question: str
    complex_cot: str
    response: str
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = ()
    # the search script's output names the question X_KEY instead (as in the demo data); keep the name
    question_key: str = "Question"

    def to_record(self) -> dict:
        values = {self.question_key: self.question, "Complex_CoT": self.complex_cot, "Response": self.response}
        if not self.complex_cot and self.key_order and "Complex_CoT" not in self.key_order:
            del values["Complex_CoT"]  # a direct-response record that had no thinking field stays so
        return _ordered({**values, **self.extra}, self.key_order)


# ---------------------------------------------------------------------------------------------------
# reading the fields of a record


def _str_field(path, rec: Record, name: str, optional: bool = False):
    if name not in rec.data:
        if optional:
            return None
        raise FormatError(path, rec.line, name, "missing")
    v = rec.data[name]
    if not isinstance(v, str):
        raise FormatError(path, rec.line, name, f"expected a string, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------------------------------
# MCQ sets

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
MEDMCQA_KEYS = ("opa", "opb", "opc", "opd")


def _letter(path, rec, name, value, options) -> str:
    if not isinstance(value, str) or value.strip().upper() not in options:
        raise FormatError(path, rec.line, name, f"expected one of the option letters {', '.join(options)}, "
                          f"got {value!r}")
    return value.strip().upper()


def _mcq_medqa(path, rec: Record):
    d = rec.data
    opts = d["options"]
    if not opts or not all(isinstance(k, str) and len(k) == 1 and k in LETTERS for k in opts) \
            or not all(isinstance(v, str) for v in opts.values()):
        raise FormatError(path, rec.line, "options", "expected an object with letters A.. as keys and strings "
                          "as values")
    if "answer_idx" in d:
        idx = _letter(path, rec, "answer_idx", d["answer_idx"], opts)
        ans = d.get("answer")
        if isinstance(ans, str) and ans.strip().casefold() != opts[idx].strip().casefold():
            raise FormatError(path, rec.line, "answer", f"{ans!r} is not the text of option {idx} ({opts[idx]!r})")
    elif isinstance(d.get("answer"), str):
        found = [k for k, v in opts.items() if v.strip().casefold() == d["answer"].strip().casefold()]
        if len(found) != 1:
            raise FormatError(path, rec.line, "answer_idx", "missing, and 'answer' is not the text of exactly one "
                              "option")
        idx = found[0]
    else:
        raise FormatError(path, rec.line, "answer_idx", "missing (MedQA style needs 'answer_idx' or 'answer')")
    return dict(opts), idx, ("options", "answer_idx", "answer")


def _mcq_list(path, rec: Record):
    d = rec.data
    opts_list = d["options"]
    if not 1 <= len(opts_list) <= len(LETTERS) or not all(isinstance(v, str) for v in opts_list):
        raise FormatError(path, rec.line, "options", f"expected a list of 1 to {len(LETTERS)} strings")
    opts = dict(zip(LETTERS, opts_list))
    idx = None
    if "answer_index" in d:
        i = d["answer_index"]
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(opts_list):
            raise FormatError(path, rec.line, "answer_index",
                              f"expected an integer in 0..{len(opts_list) - 1}, got {i!r}")
        idx = LETTERS[i]
    if "answer" in d:
        letter = _letter(path, rec, "answer", d["answer"], opts)
        if idx is not None and letter != idx:
            raise FormatError(path, rec.line, "answer", f"{letter!r} disagrees with answer_index {d['answer_index']}")
        idx = letter
    if idx is None:
        raise FormatError(path, rec.line, "answer_index",
                          "missing (a list of options needs 'answer_index' or 'answer')")
    return opts, idx, ("options", "answer_index", "answer")


def _cop_value(path, rec: Record) -> int:
    v = rec.data.get("cop")
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(path, rec.line, "cop", f"missing or not an integer (got {v!r})")
    if v < 0:
        raise FormatError(path, rec.line, "cop", f"{v}: no answer key (the MedMCQA test split is unlabeled)")
    return v


def _mcq_medmcqa(path, rec: Record, cop_base: int):
    opts = {}
    for letter, key in zip(LETTERS, MEDMCQA_KEYS):
        v = rec.data.get(key)
        if not isinstance(v, str):
            raise FormatError(path, rec.line, key, "missing or not a string")
        opts[letter] = v
    cop = _cop_value(path, rec)
    if not 0 <= cop - cop_base < 4:
        raise FormatError(path, rec.line, "cop", f"{cop} is out of range for {cop_base}-based option numbers")
    return opts, LETTERS[cop - cop_base], MEDMCQA_KEYS + ("cop",)


def _mcq_pubmedqa(path, rec: Record):
    v = rec.data["final_decision"]
    if not isinstance(v, str) or v.strip().lower() not in PUBMEDQA_OPTIONS.values():
        raise FormatError(path, rec.line, "final_decision", f"expected 'yes', 'no' or 'maybe', got {v!r}")
    idx = {t: k for k, t in PUBMEDQA_OPTIONS.items()}[v.strip().lower()]
    return dict(PUBMEDQA_OPTIONS), idx, ("final_decision",)


def detect_cop_base(path, records: list[Record]) -> int:
    """MedMCQA's `cop` is 1-based (1..4 = a..d) in the released JSON files (github.com/medmcqa, the
    files most loaders read as `cop - 1`) but 0-based (a ClassLabel 0..3) in the Hugging Face
    `medmcqa` copy. A file's values tell which: a 0 means 0-based, a 4 means 1-based."""
    values = {_cop_value(path, r) for r in records if "opa" in r.data}
    if 0 in values and 4 in values:
        raise FormatError(path, None, "cop", "values include both 0 and 4, so the option numbering is neither "
                          "0- nor 1-based; fix the file or pass cop_base")
    if 0 in values:
        return 0
    if values and 4 not in values:
        warnings.warn(f"{path}: MedMCQA 'cop' values are all in 1..3, so their base cannot be told; assuming "
                      "1-based (the released JSON files). Pass cop_base=0 (--cop-base 0) for the Hugging Face copy.",
                      stacklevel=3)
    return 1


def mcq_from_record(path, rec: Record, source: str | None = None, cop_base: int = 1) -> MCQItem:
    d = rec.data
    if "options" in d:
        if isinstance(d["options"], dict):
            opts, idx, used = _mcq_medqa(path, rec)
        elif isinstance(d["options"], list):
            opts, idx, used = _mcq_list(path, rec)
        else:
            raise FormatError(path, rec.line, "options", "expected an object with letters A.. as keys, or a list")
    elif "opa" in d:
        opts, idx, used = _mcq_medmcqa(path, rec, cop_base)
    elif "final_decision" in d:
        opts, idx, used = _mcq_pubmedqa(path, rec)
    else:
        raise FormatError(path, rec.line, "options", "missing: not an MCQ in a known layout (expected 'options' "
                          "(MedQA, MMLU-Pro, GPQA), 'opa'..'opd' (MedMCQA) or 'final_decision' (PubMedQA))")
    qkey = "question" if "question" in d or "QUESTION" not in d else "QUESTION"
    question = _str_field(path, rec, qkey)
    item_id = d.get("id", rec.key if rec.key is not None else f"{Path(path).name}:{rec.line}")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise FormatError(path, rec.line, "id", f"expected a string or an integer, got {type(item_id).__name__}")
    src = d.get("source", rec.group if rec.group is not None else source or Path(path).stem)
    if not isinstance(src, str):
        raise FormatError(path, rec.line, "source", f"expected a string, got {type(src).__name__}")
    consumed = set(used) | {qkey, "id", "source"}
    extra = {k: v for k, v in d.items() if k not in consumed}
    return MCQItem(str(item_id), question, opts, idx, src, extra)


def read_mcq(path, source: str | None = None, cop_base: int | None = None) -> list[MCQItem]:
    """MCQ items of a file; layouts are detected per item (module docstring). `source` is the tag of
    items that carry none; `cop_base` (0 or 1) the numbering of MedMCQA's `cop`, detected from the
    file's values when None (see `detect_cop_base`). Ids must be unique within the file."""
    records = read_records(path)
    if cop_base is None:
        cop_base = detect_cop_base(path, records)
    elif cop_base not in (0, 1):
        raise ValueError(f"cop_base must be 0 or 1, got {cop_base!r}")
    items, seen = [], {}
    for rec in records:
        item = mcq_from_record(path, rec, source, cop_base)
        if item.id in seen:
            raise FormatError(path, rec.line, "id", f"duplicate id {item.id!r} (first at line {seen[item.id]})")
        seen[item.id] = rec.line
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------------
# official release formats


def problem_from_record(path, rec: Record) -> VerifiableProblem:
    x, y = _str_field(path, rec, X_KEY), _str_field(path, rec, Y_KEY)
    extra = {k: v for k, v in rec.data.items() if k not in (X_KEY, Y_KEY)}
    return VerifiableProblem(x, y, extra, tuple(rec.data))


def sft_from_record(path, rec: Record) -> SFTExample:
    """The question is "Question" (the released SFT data) or, when that is absent, the verifiable
    problem's X_KEY (the search script's output, e.g. the demo data). Complex_CoT may be absent
    (direct-response data for the ablation of paper Table 2)."""
    qkey = "Question" if "Question" in rec.data or X_KEY not in rec.data else X_KEY
    q, r = _str_field(path, rec, qkey), _str_field(path, rec, "Response")
    cot = _str_field(path, rec, "Complex_CoT", optional=True) or ""
    extra = {k: v for k, v in rec.data.items() if k not in SFT_KEYS and k != qkey}
    return SFTExample(q, cot, r, extra, tuple(rec.data), qkey)


def read_problems(path) -> list[VerifiableProblem]:
    return [problem_from_record(path, r) for r in read_records(path)]


def read_sft(path) -> list[SFTExample]:
    return [sft_from_record(path, r) for r in read_records(path)]


# ---------------------------------------------------------------------------------------------------
# writing


def write_mcq(path, items: list[MCQItem]) -> None:
    write_records(path, [it.to_record() for it in items])


def write_problems(path, problems: list[VerifiableProblem]) -> None:
    write_records(path, [p.to_record() for p in problems])


def write_sft(path, examples: list[SFTExample]) -> None:
    write_records(path, [e.to_record() for e in examples])

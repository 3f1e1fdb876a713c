"""Data formats: every layout read with hand-checked values, round trips through JSON and JSONL,
errors that name file, line and field, and the 150 real released items."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from minihuatuo.services import formats as F
from minihuatuo.services import records as R

DEMO = Path(__file__).resolve().parents[2] / "shared" / "reference" / "medical_o1_demo_150.json"

MEDQA = {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "Vitamin A", "B": "Vitamin C",
         "C": "Vitamin D", "D": "Vitamin K"}, "answer_idx": "B", "answer": "Vitamin C", "meta_info": "step1"}
MEDMCQA = {"id": "m1", "question": "Drug of choice for absence seizures?", "opa": "Phenytoin", "opb": "Carbamazepine",
           "opc": "Ethosuximide", "opd": "Phenobarbital", "cop": 3, "exp": "...", "subject_name": "Pharmacology"}
PUBMEDQA = {"question": "Does X reduce Y?", "final_decision": "maybe", "pubid": 123,
            "context": {"contexts": ["First part.", "Second part."], "labels": ["A", "B"]}}
MMLU_PRO = {"question_id": 7, "question": "Which organelle makes ATP?", "options": ["Nucleus", "Ribosome",
            "Golgi", "Mitochondrion", "Lysosome"], "answer": "D", "answer_index": 3, "category": "biology"}
GPQA = {"question": "Which base pairs with adenine in RNA?", "options": ["Thymine", "Uracil", "Guanine", "Cytosine"],
        "answer_index": 1, "source": "GPQA"}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_mcq_layout_by_hand(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [MEDQA, MEDMCQA, PUBMEDQA, MMLU_PRO, GPQA])
    with pytest.warns(UserWarning, match="1-based"):  # a lone cop=3 cannot tell its base
        medqa, medmcqa, pubmedqa, mmlu, gpqa = F.read_mcq(f, source="bench")
    assert (medqa.id, medqa.source, medqa.answer_idx, medqa.answer) == ("mixed.jsonl:1", "bench", "B", "Vitamin C")
    assert medqa.extra == {"meta_info": "step1"}
    assert medmcqa.id == "m1" and medmcqa.answer_idx == "C" and medmcqa.answer == "Ethosuximide"  # cop 3 of 1..4
    assert medmcqa.options == {"A": "Phenytoin", "B": "Carbamazepine", "C": "Ethosuximide", "D": "Phenobarbital"}
    assert set(medmcqa.extra) == {"exp", "subject_name"}
    assert pubmedqa.options == {"A": "yes", "B": "no", "C": "maybe"} and pubmedqa.answer_idx == "C"
    assert pubmedqa.context == "First part.\nSecond part."
    assert mmlu.answer_idx == "D" and mmlu.answer == "Mitochondrion" and list(mmlu.options) == list("ABCDE")
    assert gpqa.answer_idx == "B" and gpqa.source == "GPQA"  # the item's own source field wins


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_mcq_round_trip(tmp_path, suffix):
    f = write_jsonl(tmp_path / "in.jsonl", [MEDQA, MEDMCQA, PUBMEDQA, MMLU_PRO, GPQA])
    items = F.read_mcq(f, cop_base=1)
    F.write_mcq(tmp_path / ("out" + suffix), items)
    again = F.read_mcq(tmp_path / ("out" + suffix))
    assert again == items
    assert [it.to_record() for it in again] == [it.to_record() for it in items]


def test_medmcqa_cop_base(tmp_path):
    def rows(*cops):
        return [dict(MEDMCQA, id=f"m{i}", cop=c) for i, c in enumerate(cops)]

    zero = F.read_mcq(write_jsonl(tmp_path / "hf.jsonl", rows(0, 3, 1)))  # a 0 => Hugging Face 0-based
    assert [it.answer_idx for it in zero] == ["A", "D", "B"]
    one = F.read_mcq(write_jsonl(tmp_path / "gh.jsonl", rows(4, 3, 1)))  # a 4 => released 1-based
    assert [it.answer_idx for it in one] == ["D", "C", "A"]
    assert [it.answer_idx for it in F.read_mcq(tmp_path / "gh.jsonl", cop_base=1)] == ["D", "C", "A"]
    with pytest.raises(ValueError, match=r"field 'cop': values include both 0 and 4"):
        F.read_mcq(write_jsonl(tmp_path / "bad.jsonl", rows(0, 4)))
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: field 'cop': 4 is out of range for 0-based"):
        F.read_mcq(tmp_path / "bad.jsonl", cop_base=0)
    with pytest.raises(ValueError, match=r"test.jsonl: line 1: field 'cop': -1: no answer key"):
        F.read_mcq(write_jsonl(tmp_path / "test.jsonl", rows(-1)))


def test_official_eval_file_and_pubmedqa_release(tmp_path):
    grouped = write_json(tmp_path / "eval_data.json", {"MedQA": [MEDQA, MEDQA], "PubMedQA": [PUBMEDQA]})
    items = F.read_mcq(grouped, source="ignored")
    assert [it.source for it in items] == ["MedQA", "MedQA", "PubMedQA"]  # the group names the source
    assert len({it.id for it in items}) == 3  # file:line ids differ per item
    release = write_json(tmp_path / "test_set.json", {"25429730": {"QUESTION": "Is it?", "CONTEXTS": ["c1", "c2"],
                                                                   "final_decision": "no", "YEAR": "2014"}})
    (it,) = F.read_mcq(release)
    assert (it.id, it.question, it.answer_idx, it.context) == ("25429730", "Is it?", "B", "c1\nc2")
    assert it.source == "test_set"  # no source given: the file name
    assert it.extra == {"CONTEXTS": ["c1", "c2"], "YEAR": "2014"}


def test_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(MEDQA) + "\n\n" + '{"question": "q", "options": {"A": 1}' + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl: line 3: invalid JSON"):
        F.read_mcq(f)
    write_jsonl(f, [MEDQA, MEDQA, {k: v for k, v in MEDQA.items() if k not in ("answer_idx", "answer")}])
    with pytest.raises(ValueError, match=r"x.jsonl: line 3: field 'answer_idx': missing"):
        F.read_mcq(f)
    write_jsonl(f, [dict(MEDQA, options={"1": "a", "2": "b"})])
    with pytest.raises(ValueError, match=r"x.jsonl: line 1: field 'options': expected an object with letters A\.\."):
        F.read_mcq(f)
    write_jsonl(f, [dict(MEDQA, question=["not", "text"])])
    with pytest.raises(ValueError, match=r"line 1: field 'question': expected a string, got list"):
        F.read_mcq(f)
    write_jsonl(f, [dict(MEDQA, answer_idx="F")])
    with pytest.raises(ValueError, match=r"field 'answer_idx': expected one of the option letters A, B, C, D"):
        F.read_mcq(f)
    write_jsonl(f, [dict(MEDQA, answer="Vitamin K")])
    with pytest.raises(ValueError, match=r"field 'answer': 'Vitamin K' is not the text of option B"):
        F.read_mcq(f)
    write_jsonl(f, [dict(MMLU_PRO, answer="C")])
    with pytest.raises(ValueError, match=r"field 'answer': 'C' disagrees with answer_index 3"):
        F.read_mcq(f)
    write_jsonl(f, [{"question": "q"}])
    with pytest.raises(ValueError, match=r"line 1: field 'options': missing: not an MCQ in a known layout"):
        F.read_mcq(f)
    write_jsonl(f, [dict(MEDQA, id="a"), dict(MEDQA, id="a")])
    with pytest.raises(ValueError, match=r"line 2: field 'id': duplicate id 'a' \(first at line 1\)"):
        F.read_mcq(f)
    f.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl: line 2: expected a JSON object, got list"):
        R.read_records(f)


def test_json_list_errors_give_the_items_line(tmp_path):
    # json.dumps(indent=2) puts item k of a list of 2-key objects on line 2 + 4k
    items = [{"Open-ended Verifiable Question": f"q{k}", "Ground-True Answer": f"a{k}"} for k in range(4)]
    items[2] = {"Open-ended Verifiable Question": "q2"}
    f = write_json(tmp_path / "p.json", items)
    assert f.read_text().splitlines()[9].strip() == "{"  # line 10 opens the bad item
    with pytest.raises(ValueError, match=r"p.json: line 10: field 'Ground-True Answer': missing"):
        F.read_problems(f)
    f.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]')
    with pytest.raises(ValueError, match=r"p.json: line 3: invalid JSON"):
        R.read_records(f)
    f.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"p.json: line 2: invalid JSON \(extra data .* named \*\.jsonl\)"):
        R.read_records(f)
    renamed = f.rename(tmp_path / "p.txt")  # an unknown suffix: several objects mean JSONL
    assert [r.data for r in R.read_records(renamed)] == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_official_formats_round_trip_unchanged(tmp_path, suffix):
    problems = [{"id": 3, "Ground-True Answer": "Parvovirus B19", "Open-ended Verifiable Question": "Which virus?",
                 "source": "MedQA"},
                {"Open-ended Verifiable Question": "Dose?", "Ground-True Answer": "5 mg", "nested": {"k": [1, 2]}}]
    sft = [{"Question": "Q?", "Complex_CoT": "Hmm, wait.", "Response": "R.", "extra": "kept"},
           {"Response": "Only an answer.", "Question": "Q2?"}]  # direct-response data: no Complex_CoT
    for name, rows, read, write in (("p", problems, F.read_problems, F.write_problems),
                                    ("s", sft, F.read_sft, F.write_sft)):
        src = write_jsonl(tmp_path / f"{name}_in.jsonl", rows)
        out = tmp_path / f"{name}_out{suffix}"
        write(out, read(src))
        back = [r.data for r in R.read_records(out)]
        assert back == rows and [list(r) for r in back] == [list(r) for r in rows]  # values and key order
    p = F.read_problems(tmp_path / "p_in.jsonl")[0]
    assert (p.x, p.y_star, p.extra) == ("Which virus?", "Parvovirus B19", {"id": 3, "source": "MedQA"})
    s = F.read_sft(tmp_path / "s_in.jsonl")
    assert (s[0].question, s[0].complex_cot, s[0].response) == ("Q?", "Hmm, wait.", "R.") and s[1].complex_cot == ""
    # records made in code (no file order) come out in the official field order
    assert list(F.VerifiableProblem("x", "y").to_record()) == ["Open-ended Verifiable Question", "Ground-True Answer"]
    assert list(F.SFTExample("q", "c", "r").to_record()) == ["Question", "Complex_CoT", "Response"]


def test_jsonl_appender_flushes_and_drops_a_cut_line(tmp_path, capsys):
    f = tmp_path / "out.jsonl"
    with R.JsonlAppender(f) as out:
        out.write({"id": "a", "output": "x"})
        assert json.loads(f.read_text()) == {"id": "a", "output": "x"}  # on disk before close
    with open(f, "a") as raw:
        raw.write('{"id": "b", "outp')  # a crash in the middle of a line
    with R.JsonlAppender(f) as out:
        out.write({"id": "c", "output": "é\u2028\x85\r"})  # line separators other than \n stay inside
    assert "incomplete last line" in capsys.readouterr().err
    assert [r.data["id"] for r in R.read_records(f)] == ["a", "c"]
    assert R.read_records(f)[1].data["output"] == "é\u2028\x85\r"


def test_a_durable_appender_fsyncs_each_record_of_its_own_file(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(R.os, "fsync", lambda fd: synced.append(fd))
    with R.JsonlAppender(tmp_path / "plain.jsonl") as out:
        out.write({"id": "a"})
    assert synced == []
    with R.JsonlAppender(tmp_path / "search.jsonl", durable=True) as out:
        out.write({"id": "a"})
        out.write({"id": "b"})
        assert synced == [out._f.fileno()] * 2


@pytest.mark.skipif(not DEMO.exists(), reason="shared reference data absent")
def test_real_demo_file_parses_in_all_three_formats(tmp_path):
    raw = json.loads(DEMO.read_text(encoding="utf-8"))
    mcq = F.read_mcq(DEMO)
    assert len(mcq) == 150 and all(set(it.options) >= set("ABCD") for it in mcq)
    assert all(it.answer == r["answer"] and it.answer_idx == r["answer_idx"] for it, r in zip(mcq, raw))
    assert mcq[0].source == "medical_o1_demo_150" and mcq[0].id == "medical_o1_demo_150.json:2"
    problems, sft = F.read_problems(DEMO), F.read_sft(DEMO)
    assert [p.y_star for p in problems] == [r["Ground-True Answer"] for r in raw]
    assert [s.question for s in sft] == [r["Open-ended Verifiable Question"] for r in raw]  # the search output layout
    assert all(s.complex_cot and s.response for s in sft)
    for write, items in ((F.write_problems, problems), (F.write_sft, sft), (F.write_mcq, mcq)):
        out = tmp_path / "out.jsonl"
        write(out, items)
        back = [r.data for r in R.read_records(out)]
        if write is F.write_mcq:
            assert F.read_mcq(out) == mcq
        else:
            assert back == raw and all(list(a) == list(b) for a, b in zip(back, raw))


def test_non_utf8_input_names_the_line_and_the_byte(tmp_path):
    """A stray Latin-1 byte on line 3 of a JSONL file: the error names the file, line 3 and the byte
    offset from the start of the file."""
    from minihuatuo.services.records import FormatError, read_records

    f = tmp_path / "bad.jsonl"
    good = b'{"a": 1}\n{"a": 2}\n'
    f.write_bytes(good + b'{"a": "caf\xe9"}\n')
    with pytest.raises(FormatError, match=rf"bad\.jsonl: line 3: not UTF-8 text \(invalid continuation byte at "
                                          rf"byte {len(good) + 10}\)"):
        read_records(f)

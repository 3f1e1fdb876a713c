"""The fair ablation's data and summary (pipeline/ablation.py): the three arms hold the same problems
in the same order, the simple arm's chains come from first chains the verifier accepted, and the
order check compares the means against the spread. The training itself is the demo's (tested there)."""
import json

import pytest

from minihuatuo.pipeline.ablation import summarize_runs, write_variant_data


def chain(conclusion: str, verdict_text: str = "The conclusion holds.") -> list[dict]:
    return [{"action": "Inner Thinking", "title": "Findings", "content": f"The findings point to {conclusion}."},
            {"action": "Final Conclusion", "content": f"The diagnosis is {conclusion}."},
            {"action": "Verification", "content": verdict_text}]


def record(pid: str, ok: bool, depth: int = 0, conclusion: str = "x") -> dict:
    rec = {"id": pid, "Question": f"question {pid}", "search": {
        "success": ok, "accepted_at": {"attempt": 2, "depth": depth} if ok else None}}
    if ok:
        rec.update(Long_CoT=chain(conclusion), Response=f"The answer is {conclusion}.", Complex_CoT="ignored")
    return rec


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_arm_holds_the_problems_both_searches_solved_in_the_recipe_order(tmp_path):
    complex_rows = [{"id": p, "Question": f"question {p}", "Complex_CoT": f"long thinking {p}\n\nWait, ...",
                     "Response": f"response {p}"} for p in ("p3", "p1", "p2", "p5")]
    write(tmp_path / "search" / "sft.jsonl", complex_rows)
    write(tmp_path / "simple_search" / "search.jsonl", [
        record("p1", True, conclusion="asthma"), record("p2", False), record("p3", True, conclusion="gout"),
        record("p4", True, conclusion="sepsis"),  # solved only by the first-chain search: in no arm
        record("p5", True, depth=1)])  # accepted after a refinement: not a simple CoT (cannot happen at N = 0)
    counts = write_variant_data(tmp_path)
    assert counts == {"complex_found": 4, "simple_found": 3, "common": 2}
    arms = {v: read(tmp_path / "data" / f"{v}.jsonl") for v in ("direct", "simple", "complex")}
    for rows in arms.values():
        assert [r["id"] for r in rows] == ["p3", "p1"]  # the recipe search's order, the common problems
    assert arms["complex"][0] == {"id": "p3", "Question": "question p3", "Complex_CoT": "long thinking p3\n\nWait, ...",
                                  "Response": "response p3"}
    assert arms["direct"][1] == {"id": "p1", "Question": "question p1", "Response": "response p1"}
    # the simple CoT is e_0's thinking and conclusion, without the verification, and its own ŷ
    assert arms["simple"][1]["Complex_CoT"] == "The findings point to asthma.\n\nThe diagnosis is asthma."
    assert arms["simple"][1]["Response"] == "The answer is asthma."
    assert "holds" not in arms["simple"][0]["Complex_CoT"]


def test_order_check_compares_the_gap_with_the_larger_std():
    def run(seed, variant, ppo):
        return {"seed": seed, "variant": variant, "sft_examples": 100, "sft": 0.5, "ppo": ppo, "rl_gain": ppo - 0.5,
                "sft_tokens": 50.0, "ppo_tokens": 60.0, "ppo_reflection": 0.5, "ppo_first_accuracy": 0.3,
                "ppo_reflection_gain": 0.1, "ppo_unfinished": 0.0}

    runs = [run(0, "direct", 0.60), run(1, "direct", 0.62), run(2, "direct", 0.64),
            run(0, "simple", 0.63), run(1, "simple", 0.70), run(2, "simple", 0.65),
            run(0, "complex", 0.80), run(1, "complex", 0.81), run(2, "complex", 0.82)]
    s = summarize_runs(runs, 3)
    assert s["variants"]["simple"]["ppo"]["mean"] == pytest.approx(0.66)
    assert s["variants"]["simple"]["ppo"]["std"] == pytest.approx(0.0360555, rel=1e-4)
    direct_simple = s["order_after_ppo"]["simple_minus_direct"]
    assert direct_simple["gap"] == pytest.approx(0.04)
    assert direct_simple["larger_std"] == pytest.approx(0.0360555, rel=1e-4)
    assert direct_simple["beyond_one_std"] is True
    simple_complex = s["order_after_ppo"]["complex_minus_simple"]
    assert simple_complex["gap"] == pytest.approx(0.15) and simple_complex["beyond_one_std"] is True
    runs[4]["ppo"] = 0.75  # simple's spread grows past its lead over direct
    s = summarize_runs(runs, 3)
    assert s["order_after_ppo"]["simple_minus_direct"]["beyond_one_std"] is False

"""world/reflection.py: the world's exact check of a searched trajectory's reflection, on hand-made
trajectories (each claim true in one case and false in another), and the demo's use of it."""
from minihuatuo.world.kb import DEFAULT_KB, load_kb
from minihuatuo.world.reflection import drop_false_reflections, read_findings, reflection_faults

KB = load_kb(DEFAULT_KB)
# a pulmonary embolism whose first finding is the classic finding of pneumonia (the tutor's anchoring trap)
PE = {"condition": "pe", "qtype": "diagnosis", "findings": ["pleuritic chest pain", "tachycardia", "sudden breathlessness"],
      "context": None}
# the first-line drug of cellulitis (flucloxacillin) is avoided in a penicillin allergy
CELL = {"condition": "cellulitis", "qtype": "treatment", "context": "penicillin_allergy",
        "findings": ["fever", "spreading skin redness", "a recent skin wound"]}


def think(text):
    return {"action": "Inner Thinking", "title": "t", "content": text}


def verify(text):
    return {"action": "Verification", "content": text}


def conclude(text):
    return {"action": "Final Conclusion", "content": text}


def chain(rejection, confirmation="Pulmonary embolism explains pleuritic chest pain, tachycardia and sudden "
                                  "breathlessness, so the conclusion holds."):
    return [think("The patient is a 58-year-old woman with pleuritic chest pain, tachycardia and sudden breathlessness."),
            think("Pleuritic chest pain is the classic finding of community-acquired pneumonia, so this is most likely "
                  "community-acquired pneumonia."),
            conclude("The most likely diagnosis is community-acquired pneumonia."),
            verify(rejection),
            think("Together, pleuritic chest pain, tachycardia and sudden breathlessness fit pulmonary embolism."),
            conclude("The most likely diagnosis is pulmonary embolism."),
            verify(confirmation)]


TRUE_REJECTION = ("Community-acquired pneumonia does not explain tachycardia and sudden breathlessness, so the "
                  "diagnosis of community-acquired pneumonia does not hold. The previous conclusion does not hold.")


def test_a_true_reflection_has_no_fault():
    assert reflection_faults(KB, PE, chain(TRUE_REJECTION)) == []
    # aliases name the same condition
    assert reflection_faults(KB, PE, chain(TRUE_REJECTION.replace("so the diagnosis of community-acquired pneumonia",
                                                                  "so the diagnosis of CAP"))) == []


def test_each_false_claim_is_found():
    cases = {
        # the tutor's oracle sentence: true, but nothing a reader could check
        "The previous conclusion, community-acquired pneumonia, has been checked and is wrong, so it does not hold.":
            "oracle verdict",
        # self-inconsistent: one condition does not explain, another is rejected
        "Pulmonary hypertension does not explain tachycardia, so the diagnosis of community-acquired pneumonia "
        "does not hold.": "self-inconsistent",
        # a finding the patient does not have
        "Community-acquired pneumonia does not explain a recent long-haul flight, so the diagnosis of "
        "community-acquired pneumonia does not hold.": "is not a finding of this patient",
        # a finding pneumonia does explain
        "Community-acquired pneumonia does not explain pleuritic chest pain and tachycardia, so the diagnosis of "
        "community-acquired pneumonia does not hold.": "does explain 'pleuritic chest pain'",
        # the right diagnosis rejected
        "Pulmonary embolism does not explain tachycardia, so the diagnosis of pulmonary embolism does not hold.":
            "rejects the right diagnosis",
        # a rejection without any reason
        "The previous conclusion does not hold.": "a rejection without a reason",
    }
    for rejection, fault in cases.items():
        faults = reflection_faults(KB, PE, chain(rejection))
        assert any(fault in f for f in faults), (rejection, faults)


def test_confirmations_must_be_true_too():
    wrong_finding = ("Pulmonary embolism explains pleuritic chest pain, tachycardia and a recent long-haul flight, "
                     "so the conclusion holds.")
    assert any("a recent long-haul flight' is not a finding" in f
               for f in reflection_faults(KB, PE, chain(TRUE_REJECTION, wrong_finding)))
    wrong_condition = ("Community-acquired pneumonia explains pleuritic chest pain and tachycardia, so the "
                       "conclusion holds.")
    assert any("does not explain 'tachycardia'" in f
               for f in reflection_faults(KB, PE, chain(TRUE_REJECTION, wrong_condition)))
    assert any("diagnosis of pulmonary embolism does not hold" in f for f in
               reflection_faults(KB, PE, chain(TRUE_REJECTION) + [think("The diagnosis of pulmonary embolism does not hold.")]))
    assert any("community-acquired pneumonia holds" in f for f in
               reflection_faults(KB, PE, chain(TRUE_REJECTION) + [think("The diagnosis of community-acquired pneumonia holds.")]))


def test_the_contraindication_and_fact_claims():
    head = "He has a penicillin allergy, and flucloxacillin is avoided in penicillin allergy, so it is not appropriate."
    assert reflection_faults(KB, CELL, [verify(head + " The previous conclusion does not hold.")]) == []
    wrong_drug = head.replace("flucloxacillin", "clarithromycin")
    assert any("clarithromycin is not avoided in penicillin allergy" in f
               for f in reflection_faults(KB, CELL, [verify(wrong_drug)]))
    wrong_context = head.replace("avoided in penicillin allergy", "avoided in pregnancy")
    assert any("is not this patient's context" in f for f in reflection_faults(KB, CELL, [verify(wrong_context)]))
    assert reflection_faults(KB, CELL, [verify("Chest X-ray is not the key investigation for cellulitis.")]) == []
    assert any("skin swab is the key investigation" in f for f in
               reflection_faults(KB, CELL, [verify("skin swab is not the key investigation for cellulitis.")]))


def test_findings_that_hold_the_word_and():
    named, rest = read_findings("nausea and vomiting and a fever", ["nausea and vomiting", "a fever"])
    assert sorted(named) == ["a fever", "nausea and vomiting"] and rest == ""
    named, rest = read_findings("nausea, a rash and a fever", ["nausea and vomiting", "a fever"])
    assert named == ["a fever"] and rest == "nausea a rash"


def test_drop_marks_only_faulty_found_trajectories():
    def record(i, actions, success=True):
        return {"id": i, "source_id": f"s{i}", "Long_CoT": actions,
                "search": {"success": success, "failure_reason": None, "failure_detail": None}}
    good, bad, failed = (record(0, chain(TRUE_REJECTION)), record(1, chain("The previous conclusion does not hold.")),
                         record(2, chain("The previous conclusion does not hold."), success=False))
    marked = drop_false_reflections(KB, [good, bad, failed], {"s0": PE, "s1": PE, "s2": PE})
    assert marked == [bad] and bad["search"]["failure_reason"] == "false_reflection"
    assert good["search"]["success"] and failed["search"]["failure_reason"] is None


def test_a_treatment_confirmation_must_check_the_patients_context():
    ignored = verify("Cellulitis explains fever, spreading skin redness and a recent skin wound, and clarithromycin "
                     "is its first-line treatment, so the conclusion holds.")
    assert any("without checking the patient's penicillin allergy" in f for f in reflection_faults(KB, CELL, [ignored]))
    checked = verify("Cellulitis explains fever, spreading skin redness and a recent skin wound, and clarithromycin "
                     "is safe in penicillin allergy, so the conclusion holds.")
    assert reflection_faults(KB, CELL, [checked]) == []
    # no context, or not a treatment question: nothing to check
    assert reflection_faults(KB, dict(CELL, context=None), [ignored]) == []
    assert reflection_faults(KB, dict(CELL, qtype="investigation"), [ignored]) == []
    # a rejection is not a confirmation
    assert not any("without checking" in f for f in reflection_faults(KB, CELL, [verify(
        "Cellulitis does not explain x, so the diagnosis of cellulitis does not hold.")]))


def test_the_demo_search_retries_an_attempt_whose_reflection_is_false(tmp_path):
    """search.false_reflection = "retry": the world's check runs inside the demo's search (the base
    model as search LLM, real world problems); every trajectory kept is true of its case, every attempt
    the check ended is listed with its faults, and the problems that needed it searched again."""
    import json
    from dataclasses import replace

    from minihuatuo.pipeline.demo import DemoConfig, search_trajectories
    from minihuatuo.services.backends import LocalBackend
    from minihuatuo.services.formats import VerifiableProblem
    from minihuatuo.stages.problem_rules import reformat_offline
    from minihuatuo.world.evaluation import world_verifier
    from minihuatuo.world.exam import generate_exam

    cfg = DemoConfig()
    items = generate_exam(KB, "train", 24, 0, cfg.train_exam)
    problems = [VerifiableProblem(*reformat_offline(it), {"source_id": it.id}) for it in items]
    worlds = {it.id: it.extra["world"] for it in items}
    base = LocalBackend.from_dir(cfg.base, dtype="float32", batch_size=24, seed=0)
    search_trajectories(replace(cfg.search, false_reflection="retry", max_in_flight=24, max_depth=1), tmp_path, problems, base,
                        world_verifier(KB), worlds)
    records = [json.loads(line) for line in open(tmp_path / "search.jsonl")]
    kept = [r for r in records if r["search"]["success"]]
    assert kept and all(reflection_faults(KB, worlds[r["source_id"]], r["Long_CoT"]) == [] for r in kept)
    ended = [json.loads(line) for line in open(tmp_path / "false_reflections.jsonl")]
    assert ended and all(e["faults"] and "Complex_CoT" not in e for e in ended)  # none kept, so none marked after
    for e in ended:  # the attempt the check ended is followed by another, or the problem is discarded for it
        s = next(r["search"] for r in records if r["id"] == e["id"])
        assert s["attempts"] > e["attempt"] or s["failure_reason"] == "false_reflection"

"""The conformance vectors of notes/vectors/ (issue 17): every file equals what tests/conformance.py computes
from the code now, no file lacks a generator, the values are finite, a float32 run of the same code meets
the float32 tolerance each file states, the cases are not trivial, and each family is checked once more
against plain-Python arithmetic written here, independent of the code that generated it.

Why floats are compared with a tolerance and not as text: the float64 results can move by an ulp or a
few across CPUs and torch builds (vectorised exp/log, summation order), so floats must agree within
rtol 1e-12 + atol 1e-12 (thousands of ulps of headroom, far below any real change); everything else
(keys, lengths, strings, ints, booleans, None, and each file's header) must be identical.
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("conformance", Path(__file__).with_name("conformance.py"))
conformance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conformance)

VECTOR_DIR = conformance.VECTOR_DIR
RTOL, ATOL = 1e-12, 1e-12


def _refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")


def load(name: str) -> dict:
    """A committed vector file, refusing NaN / Infinity (not JSON; a port's parser may reject them)."""
    return json.loads((VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8"), parse_constant=_refuse)


def cases(name: str) -> dict[str, dict]:
    return {c["name"]: c for c in load(name)["cases"]}


def assert_same(got, want, rtol, atol, path="$"):
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], rtol, atol, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, rtol, atol, f"{path}[{i}]")
    elif isinstance(want, float):
        assert math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def close(a, b, rtol=RTOL, atol=ATOL):
    return abs(a - b) <= atol + rtol * abs(b)


def flat(x):
    return [v for row in x for v in flat(row)] if isinstance(x, list) else [x]


# ----------------------------------------------------------------------------- the files are the code's

@pytest.mark.parametrize("name", list(conformance.GENERATORS))
def test_vector_file_equals_what_the_code_computes(name):
    path = VECTOR_DIR / f"{name}.json"
    assert path.exists(), f"{path} missing: run `python tests/conformance.py --write`"
    regenerated = json.loads(conformance.dumps(conformance.generate(name)))  # as the file would be written
    assert_same(regenerated, load(name), RTOL, ATOL)


def test_every_vector_file_has_a_generator():
    on_disk = {p.stem for p in VECTOR_DIR.glob("*.json")}
    assert on_disk - set(conformance.GENERATORS) == set(), "vector files that no generator produces"
    assert set(conformance.FLOAT_GENERATORS) <= set(conformance.GENERATORS)


@pytest.mark.parametrize("name", list(conformance.GENERATORS))
def test_vector_file_format(name):
    content = load(name)
    assert list(content) == ["function", "signature", "doc", "dtype", "tolerance", "cases"]
    assert content["function"].startswith("minihuatuo.") and "\n" not in content["doc"]
    assert content["cases"] and all(list(c) == ["name", "inputs", "expected"] for c in content["cases"])
    names = [c["name"] for c in content["cases"]]
    assert len(set(names)) == len(names)
    assert conformance.non_finite(content) == []
    if name in conformance.FLOAT_GENERATORS:
        assert content["dtype"] == "float64"
        assert set(content["tolerance"]) >= {"float64", "float32"}
        for c in content["cases"]:  # masks are 0/1 lists
            for k, v in c["inputs"].items():
                if "mask" in k:
                    assert set(flat(v)) <= {0, 1} and all(type(x) is int for x in flat(v)), (c["name"], k)
    else:
        assert content["tolerance"] == {"exact": True}


@pytest.mark.parametrize("name", conformance.FLOAT_GENERATORS)
def test_a_float32_run_meets_the_stated_float32_tolerance(name):
    """The same code in float32, against the stored float64 values: what an fp32 port can expect. This also
    checks that the large-value edge cases stay finite in float32 (exp(100) overflows there)."""
    content = load(name)
    tol = content["tolerance"]["float32"]
    run32 = conformance.GENERATORS[name](torch.float32)
    for want, got in zip(content["cases"], run32["cases"]):
        assert_same(json.loads(json.dumps(got["expected"])), want["expected"], tol["rtol"], tol["atol"],
                    f"{name}:{want['name']}")


# ----------------------------------------------------------------------------- the cases are not trivial

def test_ppo_cases_exercise_what_they_claim():
    c = cases("ppo_per_token_rewards")
    a, b = c["official_after_stop"], c["last_slot"]
    assert a["inputs"]["score_slot"] == "after_stop" and b["inputs"]["score_slot"] == "last"
    assert a["expected"]["rewards"] != b["expected"]["rewards"]  # the two slots differ on the same inputs
    R = len(a["inputs"]["logprobs"][0])
    assert R - 1 in a["inputs"]["last"] and any(L < R - 1 for L in a["inputs"]["last"])  # both slot rules
    assert a["inputs"]["beta"] > 0 and any(v != 0 for v in flat(a["expected"]["kl"]))

    g = cases("ppo_gae")
    assert any(x["inputs"]["gamma"] < 1 and x["inputs"]["lam"] < 1 and any(flat(x["inputs"]["values"]))
               for x in g.values())
    assert (g["official_gamma1_lam095"]["inputs"]["gamma"], g["official_gamma1_lam095"]["inputs"]["lam"]) == (1.0, 0.95)

    w = cases("ppo_masked_whiten")
    assert "stats" in w["global_stats_from_two_ranks"]["inputs"]
    pad = w["padding_ignored"]
    assert any(m == 0 and abs(x) >= 50 for x, m in zip(flat(pad["inputs"]["x"]), flat(pad["inputs"]["mask"])))

    for file in ("ppo_policy_loss", "ppo_value_loss"):
        fracs = [f for x in cases(file).values() for f in x["expected"]["clip_fraction"]]
        assert any(0 < f < 1 for f in fracs) and 0.0 in fracs, file

    # the policy-loss hand case has, on valid tokens, the clip binding for A > 0 (rho > 1+eps) and A < 0
    # (rho < 1-eps), and not binding on the other side of each
    p = cases("ppo_policy_loss")["both_clip_sides_bind_and_not"]["inputs"]
    eps, kinds = p["clip"], set()
    for n, o, A, m in zip(*(flat(p[k]) for k in ("logprobs", "old_logprobs", "advantages", "mask"))):
        r = math.exp(n - o)
        if m:
            kinds.add((A > 0, "above" if r > 1 + eps else "below" if r < 1 - eps else "inside"))
    assert {(True, "above"), (True, "below"), (False, "above"), (False, "below")} <= kinds


def test_rl_variant_cases_exercise_what_they_claim():
    lo = cases("rloo_leave_one_out_advantages")
    assert any(x["inputs"]["k"] >= 3 for x in lo.values())
    s = cases("rloo_sequence_policy_loss")
    big = s["large_log_ratio_and_padding_minus_100"]
    assert max(big["expected"]["log_ratio"]) > 100 and min(big["expected"]["log_ratio"]) < -100
    assert any(x == -100.0 and m == 0 for x, m in zip(flat(big["inputs"]["logprobs"]), flat(big["inputs"]["mask"])))
    clipped = [f for x in s.values() for f in x["expected"]["clipped"]]
    assert True in clipped and False in clipped

    ga = cases("grpo_group_advantages")["G2_with_a_zero_std_group"]
    G, adv = ga["inputs"]["G"], ga["expected"]["advantages"]
    n = len(adv) // G
    assert any(all(adv[g * n + j] == 0.0 for g in range(G)) for j in range(n))  # an all-equal group: A = 0
    gl = cases("grpo_loss")
    assert any(0 < f < 1 for x in gl.values() for f in x["expected"]["clip_fraction"])
    e = gl["large_log_ratio_and_padding_minus_100"]["inputs"]
    for row_n, row_o, row_m in zip(e["logprobs"], e["old_logprobs"], e["mask"]):
        assert abs(sum((a - b) * m for a, b, m in zip(row_n, row_o, row_m))) > 100
        assert any(a == -100.0 and m == 0 for a, m in zip(row_n, row_m))

    d = cases("dpo_loss")
    assert any(x["inputs"]["label_smoothing"] > 0 for x in d.values())
    assert any(x["inputs"]["beta"] == 1.0 for x in d.values())


def test_reward_scorer_and_logprob_cases_exercise_what_they_claim():
    r = load("reward_rule")["cases"]
    default = [v for c in r if c["inputs"]["config"]["require_thinking"] and c["inputs"]["config"]["correct"] == 1.0
               for v in c["expected"]["rewards"]]
    assert {1.0, 0.1, 0.0} <= set(default)
    assert any(not c["inputs"]["config"]["require_thinking"] for c in r)

    ex = load("evaluate_extract_choice")["cases"]
    assert len(ex) >= 15
    assert {c["expected"]["step"] for c in ex} == {"explicit", "letter", "text", "similar", "none"}
    assert any(c["expected"]["first"] != c["expected"]["last"] for c in ex)
    assert any("## Final Response" in c["inputs"]["output"] for c in ex)

    lp = load("token_logprobs_entropy")["cases"]
    assert {c["inputs"]["temperature"] for c in lp} == {1.0, 0.7, 0.5}
    V = len(lp[0]["inputs"]["logits"][0])
    assert -100 in flat(lp[0]["inputs"]["targets"]) and V in flat(lp[0]["inputs"]["targets"])


# ----------------------------------------------------------------------------- independent checks

def test_per_token_rewards_by_a_plain_loop():
    for c in load("ppo_per_token_rewards")["cases"]:
        i, e = c["inputs"], c["expected"]
        for b, L in enumerate(i["last"]):
            R = len(i["logprobs"][b])
            kl = [(i["logprobs"][b][t] - i["ref_logprobs"][b][t]) if t <= L else 0.0 for t in range(R)]
            r = [-i["beta"] * k for k in kl]
            slot = L + 1 if i["score_slot"] == "after_stop" and L + 1 < R else L
            r[slot] += i["scores"][b]
            assert all(close(x, y) for x, y in zip(kl, e["kl"][b])), c["name"]
            assert all(close(x, y) for x, y in zip(r, e["rewards"][b])), c["name"]


def test_gae_by_a_plain_loop():
    for c in load("ppo_gae")["cases"]:
        i, e = c["inputs"], c["expected"]
        g, lam = i["gamma"], i["lam"]
        for rew, val, want in zip(i["rewards"], i["values"], e["advantages"]):
            R, a, out = len(rew), 0.0, [0.0] * len(rew)
            for t in range(R - 1, -1, -1):
                a = rew[t] + g * (val[t + 1] if t + 1 < R else 0.0) - val[t] + g * lam * a
                out[t] = a
            assert all(close(x, y) for x, y in zip(out, want)), c["name"]


def test_whitening_by_the_statistics_module():
    for c in load("ppo_masked_whiten")["cases"]:
        i, e = c["inputs"], c["expected"]
        xs, ms = flat(i["x"]), flat(i["mask"])
        valid = [x for x, m in zip(xs, ms) if m]
        if "stats" in i:
            s, ss, n = i["stats"]
            mean = s / n
            var = (ss - n * mean * mean) / (n - 1)
        else:
            mean = statistics.fmean(valid)
            var = statistics.variance(valid) if len(valid) > 1 else 0.0
        want = [(x - mean) / math.sqrt(var + i["eps"]) if m else 0.0 for x, m in zip(xs, ms)]
        assert all(close(a, b, atol=1e-11) for a, b in zip(want, flat(e["whitened"]))), c["name"]


def test_clipped_losses_by_hand():
    for c in load("ppo_policy_loss")["cases"]:
        i, e = c["inputs"], c["expected"]
        eps = i["clip"]
        for b in range(len(i["mask"])):
            terms, clipped = [], []
            for n, o, A, m in zip(i["logprobs"][b], i["old_logprobs"][b], i["advantages"][b], i["mask"][b]):
                if m:
                    r = math.exp(n - o)
                    u, k = -A * r, -A * min(max(r, 1 - eps), 1 + eps)
                    terms.append(max(u, k))
                    clipped.append(k > u)
            assert close(sum(terms) / len(terms), e["loss"][b]), c["name"]
            assert close(sum(clipped) / len(clipped), e["clip_fraction"][b], rtol=1e-7), c["name"]
    for c in load("ppo_value_loss")["cases"]:
        i, e = c["inputs"], c["expected"]
        eps = i["clip_value"]
        for b in range(len(i["mask"])):
            terms, clipped = [], []
            for v, o, R, m in zip(i["values"][b], i["old_values"][b], i["returns"][b], i["mask"][b]):
                if m:
                    u, k = (v - R) ** 2, (o + min(max(v - o, -eps), eps) - R) ** 2
                    terms.append(max(u, k))
                    clipped.append(k > u)
            assert close(0.5 * sum(terms) / len(terms), e["loss"][b]), c["name"]
            assert close(sum(clipped) / len(clipped), e["clip_fraction"][b], rtol=1e-7), c["name"]


def test_rloo_by_hand():
    for c in load("rloo_sequence_rewards")["cases"]:
        i = c["inputs"]
        want = [s - i["beta"] * sum(row) for s, row in zip(i["scores"], i["kl"])]
        assert all(close(a, b) for a, b in zip(want, c["expected"]["rewards"])), c["name"]
    for c in load("rloo_leave_one_out_advantages")["cases"]:
        r, k = c["inputs"]["rewards"], c["inputs"]["k"]
        n = len(r) // k
        want = [r[j] - (sum(r[g * n + j % n] for g in range(k)) - r[j]) / (k - 1) for j in range(len(r))]
        assert all(close(a, b, atol=1e-15) for a, b in zip(want, c["expected"]["advantages"])), c["name"]
    for c in load("rloo_sequence_policy_loss")["cases"]:
        i, e = c["inputs"], c["expected"]
        eps, bound = i["clip"], i.get("max_log_ratio", math.inf)
        for b, A in enumerate(i["advantages"]):
            lr = sum((n - o) for n, o, m in zip(i["logprobs"][b], i["old_logprobs"][b], i["mask"][b]) if m)
            r = math.exp(min(lr, bound))
            u, k = -A * r, -A * min(max(r, 1 - eps), 1 + eps)
            assert close(lr, e["log_ratio"][b]) and close(max(u, k), e["loss"][b]), (c["name"], b)
            assert e["clipped"][b] == (k > u), (c["name"], b)


def test_grpo_by_hand():
    for c in load("grpo_group_advantages")["cases"]:
        s, G, eps = c["inputs"]["scores"], c["inputs"]["G"], c["inputs"]["eps"]
        n = len(s) // G
        for j in range(n):
            group = [s[g * n + j] for g in range(G)]
            mu, sd = statistics.fmean(group), statistics.stdev(group)
            for g in range(G):
                got = c["expected"]["advantages"][g * n + j]
                want = 0.0 if sd == 0 else (group[g] - mu) / (sd + eps)
                assert close(want, got, atol=1e-11), (c["name"], g, j)  # a zero-std group: 0 up to rounding
    k3 = lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1  # noqa: E731
    for c in load("grpo_k3")["cases"]:
        i = c["inputs"]
        ms = flat(i["mask"]) if "mask" in i else [1] * len(flat(i["logprobs"]))
        want = [k3(a, b) if m else 0.0 for a, b, m in zip(flat(i["logprobs"]), flat(i["ref_logprobs"]), ms)]
        assert all(close(a, b) for a, b in zip(want, flat(c["expected"]["k3"]))), c["name"]
    for c in load("grpo_loss")["cases"]:
        i, e = c["inputs"], c["expected"]
        eps, beta = i["clip"], i["beta"]
        for b, A in enumerate(i["advantages"]):
            terms, kls, clipped = [], [], []
            for n, o, ref, m in zip(i["logprobs"][b], i["old_logprobs"][b], i["ref_logprobs"][b], i["mask"][b]):
                if m:
                    r = math.exp(n - o)
                    u, k = -A * r, -A * min(max(r, 1 - eps), 1 + eps)
                    kls.append(k3(n, ref))
                    terms.append(max(u, k) + beta * kls[-1])
                    clipped.append(k > u)
            assert close(sum(terms) / len(terms), e["loss"][b]), (c["name"], b)
            assert close(sum(kls) / len(kls), e["mean_k3"][b]), (c["name"], b)
            assert close(sum(clipped) / len(clipped), e["clip_fraction"][b], rtol=1e-7), (c["name"], b)


def test_dpo_by_hand():
    def neg_log_sigmoid(x):  # −log σ(x), stable both ways
        return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))

    for c in load("dpo_loss")["cases"]:
        i, e = c["inputs"], c["expected"]
        beta, ls = i["beta"], i["label_smoothing"]
        for b in range(len(i["policy_chosen"])):
            cw = i["policy_chosen"][b] - i["ref_chosen"][b]
            cl = i["policy_rejected"][b] - i["ref_rejected"][b]
            z = beta * (cw - cl)
            assert close((1 - ls) * neg_log_sigmoid(z) + ls * neg_log_sigmoid(-z), e["loss"][b]), (c["name"], b)
            assert close(beta * cw, e["chosen_reward"][b]) and close(beta * cl, e["rejected_reward"][b])
    # and one case fully by hand: Δ = (−1 + 1.5) − (−2 + 1.5) = 1, β = 0.5 → −log σ(0.5) = log(1 + e^−0.5)
    h = cases("dpo_loss")["hand_beta05"]["expected"]
    assert h["loss"][0] == pytest.approx(0.47407698418010663, rel=1e-12)
    assert h["chosen_reward"] == [0.25, -0.5] and h["rejected_reward"] == [-0.25, 0.5]


def test_reward_rule_by_hand():
    want = {  # the paper's rule read off the outputs by hand: 1 verified, 0.1 not, 0 without the format
        "correct": [1.0], "wrong_answer": [0.1], "alias_accepted": [1.0], "hedged_answer_rejected": [0.1],
        "missing_final_response_header": [0.0], "missing_thinking_header": [0.0], "final_before_thinking": [0.0],
        "two_final_response_headers": [0.0], "empty_final_response": [0.0],
        "final_response_without_blank_lines": [1.0], "batch_of_three": [1.0, 0.1, 0.0],
        "custom_values": [2.0, -0.5, -1.0], "direct_response_ablation_no_thinking_required": [1.0, 1.0, 0.1, 0.0],
        # issue 25: hacks name the answer without committing to it; a reflection that ends on it commits
        "hack_list_of_candidates_rejected": [0.1], "hack_lettered_options_rejected": [0.1],
        "hack_negated_then_another_answer_rejected": [0.1], "hack_abandoned_first_answer_rejected": [0.1],
        "reflection_ending_on_the_answer_accepted": [1.0],
    }
    got = {c["name"]: c["expected"]["rewards"] for c in load("reward_rule")["cases"]}
    assert got == want
    for c in load("reward_rule")["cases"]:  # the verifier is asked only about well-formed outputs
        formatted = [r for r in c["expected"]["rewards"] if r != c["inputs"]["config"]["no_format"]]
        assert len(c["expected"]["verifier_calls"]) == len(formatted), c["name"]


def test_extract_choice_by_hand():
    want = {
        "explicit_strict_letter": ("C", "C", "explicit"), "explicit_parenthesised": ("D", "D", "explicit"),
        "explicit_lowercase_with_period": ("C", "C", "explicit"), "explicit_bold_colon": ("E", "E", "explicit"),
        "explicit_first_and_last_differ": ("A", "D", "explicit"),
        "lowercase_without_punctuation_is_no_answer": ("E", "E", "text"),
        "isolated_letter": ("D", "D", "letter"), "isolated_letters_first_last": ("B", "E", "letter"),
        "article_and_names_are_not_letters": ("C", "C", "letter"),
        "pronoun_I_with_ten_options": ("B", "B", "letter"),
        "option_text_only": ("B", "B", "text"), "option_text_longest_wins": ("B", "E", "text"),
        "option_text_case_folded": ("C", "C", "text"), "difflib_fallback": ("D", "D", "similar"),
        "difflib_fallback_off": (None, None, "none"), "final_response_split": ("B", "B", "explicit"),
        "final_response_split_text": ("B", "B", "text"), "cjk_letter": ("C", "C", "letter"),
        "empty_output": (None, None, "none"),
    }
    got = {c["name"]: (c["expected"]["first"], c["expected"]["last"], c["expected"]["step"])
           for c in load("evaluate_extract_choice")["cases"]}
    assert got == want


def test_tempered_logprobs_by_hand():
    for c in load("token_logprobs_entropy")["cases"]:
        i, e = c["inputs"], c["expected"]
        T = i["temperature"]
        rows, targets = i["logits"], i["targets"]
        if isinstance(targets[0], list):  # batch dims: flatten (..., V) to rows
            rows, targets = [r for block in rows for r in block], flat(targets)
        for row, a, lp, h in zip(rows, targets, flat(e["logprobs"]), flat(e["entropy"])):
            z = [x / T for x in row]
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            p = [math.exp(x - lse) for x in z]
            assert close(z[a] - lse if 0 <= a < len(row) else 0.0, lp), c["name"]
            assert close(-sum(q * (x - lse) for q, x in zip(p, z) if q > 0), h, atol=1e-11), c["name"]

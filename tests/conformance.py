"""Conformance vectors for ports (issue 17): small fixed inputs and the expected outputs of the RL math,
the reward rule, the MCQ scorer and the tempered log-prob reference, written to notes/vectors/*.json.

One function per vector file; each returns the file's whole content, computed by calling the project's
own functions on inputs that are written out below (hand-chosen, or drawn once from a seeded generator
and stored in the file, so a port never needs this generator). Float math runs in float64; the
functions that take `dtype` can also run in float32, which tests/test_vectors.py uses to check that the
fp32 tolerance stated in each file is one a float32 port can meet.

    python tests/conformance.py --write     # rewrite notes/vectors/*.json from the code
    python tests/conformance.py             # report which files differ from the code (exit 1 if any)

tests/test_vectors.py regenerates every file in memory and fails on any difference.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tests/conformance.py` from a clone without an install
    sys.path.insert(0, str(ROOT))

from minihuatuo.engine.reference_kernels import token_logprobs_and_entropy  # noqa: E402
from minihuatuo.services.reward import RewardConfig, rewards  # noqa: E402
from minihuatuo.services.verifier import RuleVerifier  # noqa: E402
from minihuatuo.stages.evaluate import extract_choice  # noqa: E402
from minihuatuo.stages.rl import (
    dpo,
    grpo,
    ppo,
    rloo,  # noqa: E402
)

VECTOR_DIR = ROOT / "notes" / "vectors"
F64 = torch.float64

# Tolerances a port should use: |got − expected| <= atol + rtol·|expected|, element by element.
TOL_FLOAT = {"float64": {"rtol": 1e-12, "atol": 1e-12}, "float32": {"rtol": 1e-5, "atol": 1e-6}}
# The reference computes clip fractions as a float32 mean (`(clipped > unclipped).float()`) even on float64
# inputs, so they are exact only to float32 (1/3 is stored as 0.3333333432674408).
TOL_CLIPFRAC = {**TOL_FLOAT, "float32_fields": ["clip_fraction"],
                "note": "clip_fraction is a float32 mean in the reference even for float64 inputs: compare it "
                        "with the float32 tolerance"}
TOL_EXACT = {"exact": True}


# ----------------------------------------------------------------------------- helpers

def _json(x):
    """Tensors and tuples → nested lists; -0.0 → 0.0 (a sign of zero is no part of the contract)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, float):
        return x + 0.0
    return x


def _t(x, dtype):
    return torch.tensor(x, dtype=dtype)


def _mask(x):
    return torch.tensor(x, dtype=torch.bool)


def _masks_from_last(last: list[int], R: int):
    """policy mask (t <= L) and value mask (t <= L + 1) as 0/1 lists (rl.masks_from_last)."""
    return ([[int(t <= L) for t in range(R)] for L in last], [[int(t <= L + 1) for t in range(R)] for L in last])


def _randn(seed: int, *shape, scale: float = 1.0, digits: int = 6):
    """A seeded draw, rounded to `digits` decimals so that the stored value is short; the rounded value
    is the input (it is stored in the file and fed as is)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=F64) * scale
    return [[round(v, digits) for v in row] for row in x.tolist()] if len(shape) == 2 else \
        [round(v, digits) for v in x.tolist()]


def _case(name: str, inputs: dict, expected: dict) -> dict:
    return {"name": name, "inputs": _json(inputs), "expected": _json(expected)}


def _optional(fn, name):
    """The default of keyword `name` of `fn`, or None when `fn` has no such parameter."""
    p = inspect.signature(fn).parameters.get(name)
    return None if p is None else p.default


def _file(function: str, signature: str, doc: str, cases: list[dict], dtype, tolerance=TOL_FLOAT) -> dict:
    return {"function": function, "signature": signature, "doc": doc,
            "dtype": dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
            "tolerance": tolerance, "cases": cases}


# ----------------------------------------------------------------------------- PPO

def ppo_per_token_rewards(dtype=F64) -> dict:
    def run(name, logprobs, ref_logprobs, scores, last, beta, score_slot):
        R = len(logprobs[0])
        policy_mask, _ = _masks_from_last(last, R)
        r, kl = ppo.per_token_rewards(_t(logprobs, dtype), _t(ref_logprobs, dtype), _t(scores, dtype),
                                      _mask(policy_mask), torch.tensor(last), beta, score_slot)
        return _case(name, dict(logprobs=logprobs, ref_logprobs=ref_logprobs, scores=scores,
                                policy_mask=policy_mask, last=last, beta=beta, score_slot=score_slot),
                     dict(rewards=r, kl=kl))

    # rows: stop token at t = 1 (score slot 2), no room after the last token (L = R − 1), L = 0, L = 2;
    # the padded slots hold junk log-probs that must not count
    lp = [[-0.25, -1.5, 3.0, 3.0, 3.0], [-0.75, -0.125, -2.0, -0.5, -1.0], [-3.0, 9.0, 9.0, 9.0, 9.0],
          [-0.5, -0.5, -0.0625, -7.0, 1.0]]
    ref = [[-0.5, -1.0, -4.0, 0.0, 0.0], [-0.75, -0.625, -1.0, -0.25, -3.0], [-1.0, 0.0, 0.0, 0.0, 0.0],
           [-0.25, -1.5, -0.0625, 0.0, 0.0]]
    scores, last = [1.0, 0.1, 0.0, 1.0], [1, 4, 0, 2]
    rand_lp, rand_ref = _randn(101, 3, 6, scale=0.5), _randn(102, 3, 6, scale=0.5)
    cases = [
        run("official_after_stop", lp, ref, scores, last, 0.03, "after_stop"),
        run("last_slot", lp, ref, scores, last, 0.03, "last"),
        run("beta_zero_score_only_after_stop", lp, ref, scores, last, 0.0, "after_stop"),
        run("seeded_random_after_stop", rand_lp, rand_ref, [1.0, 0.1, 0.0], [3, 5, 1], 0.1, "after_stop"),
        run("seeded_random_last", rand_lp, rand_ref, [1.0, 0.1, 0.0], [3, 5, 1], 0.1, "last"),
    ]
    return _file("minihuatuo.stages.rl.ppo.per_token_rewards",
                 "per_token_rewards(logprobs (B,R), ref_logprobs (B,R), scores (B,), policy_mask (B,R) bool, "
                 "last (B,) int, beta, score_slot) -> (rewards (B,R), kl (B,R))",
                 "r_t = -beta*kl_t, kl_t = (log pi_old - log pi_ref)_t * policy_mask (k1), plus the score at "
                 "slot L+1 ('after_stop') or L ('last'), L+1 falling back to L when L+1 = R (notes/ppo.md "
                 "checklist 18-19; paper §3.2 reward with KL)", cases, dtype)


def ppo_gae(dtype=F64) -> dict:
    def run(name, rewards, values, gamma, lam):
        a = ppo.gae(_t(rewards, dtype), _t(values, dtype), gamma, lam)
        return _case(name, dict(rewards=rewards, values=values, gamma=gamma, lam=lam), dict(advantages=a))

    # an EOS-terminated row (L = 2, score 1 at slot 3) and a row without stop (score on its last slot);
    # values are 0 beyond L + 1 as ppo.collect makes them
    rewards = [[-0.015, 0.0075, -0.03, 1.0, 0.0, 0.0], [0.003, -0.009, 0.0, 0.012, -0.006, 0.1]]
    values = [[0.25, 0.5, 0.625, 0.75, 0.0, 0.0], [0.125, -0.25, 0.375, 0.0, 0.5, -0.125]]
    _, vmask = _masks_from_last([1, 4, 5], 7)
    rand_r = [[v * m for v, m in zip(row, mrow)] for row, mrow in zip(_randn(201, 3, 7, scale=0.1), vmask)]
    rand_v = [[v * m for v, m in zip(row, mrow)] for row, mrow in zip(_randn(202, 3, 7, scale=0.5), vmask)]
    cases = [
        run("official_gamma1_lam095", rewards, values, 1.0, 0.95),
        run("gamma09_lam08", rewards, values, 0.9, 0.8),
        run("monte_carlo_lam1", rewards, values, 1.0, 1.0),
        run("one_step_td_lam0", rewards, values, 0.99, 0.0),
        run("zero_values_score_only", [[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]],
            [[0.0] * 5, [0.0] * 5], 1.0, 0.95),
        run("seeded_random_gamma097_lam09", rand_r, rand_v, 0.97, 0.9),
    ]
    return _file("minihuatuo.stages.rl.ppo.gae",
                 "gae(rewards (B,R), values (B,R), gamma, lam) -> advantages (B,R)",
                 "GAE over all R slots backwards: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam "
                 "A_{t+1}, V_R = A_R = 0 (Schulman et al. 2016 eq. 16; notes/ppo.md checklist 21)",
                 cases, dtype)


def ppo_masked_whiten(dtype=F64) -> dict:
    def run(name, x, mask, eps=1e-8, stats=None):
        st = tuple(_t(v, dtype) for v in stats) if stats is not None else None
        w = ppo.masked_whiten(_t(x, dtype), _mask(mask), eps=eps, stats=st)
        inputs = dict(x=x, mask=mask, eps=eps)
        if stats is not None:
            inputs["stats"] = stats
        return _case(name, inputs, dict(whitened=w))

    x = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    pm, _ = _masks_from_last([2, 6, 0, 4], 7)
    rand = _randn(301, 4, 7, scale=0.8)
    # global whitening: (sum, sum of squares, count) over this rank's valid entries plus another rank's
    valid = [v for row, mrow in zip(x, mask) for v, m in zip(row, mrow) if m]
    other = [-1.5, 0.5, 2.25]
    stats = [sum(valid) + sum(other), sum(v * v for v in valid) + sum(v * v for v in other),
             float(len(valid) + len(other))]
    cases = [
        run("padding_ignored", x, mask),
        run("eps_one", x, mask, eps=1.0),
        run("single_valid_token", [[3.5, 2.0, -1.0]], [[1, 0, 0]]),
        run("constant_values_give_zero", [[0.5, 0.5, 9.0], [0.5, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]),
        run("offset_mean_10", [[10.25, 9.5, 10.75, 0.0], [10.0, 9.75, 11.0, 10.5]], [[1, 1, 1, 0], [1, 1, 1, 1]]),
        run("global_stats_from_two_ranks", x, mask, stats=stats),
        run("seeded_random", rand, pm),
    ]
    return _file("minihuatuo.stages.rl.ppo.masked_whiten",
                 "masked_whiten(x (B,R), mask (B,R) bool, eps=1e-8, stats=None | (sum, sum of squares, count)) "
                 "-> (B,R)",
                 "(x - mu)/sqrt(var + eps) with mu and the UNBIASED var over masked entries (one-pass: "
                 "var = (ss/n - mu^2) n/(n-1), n = 1 gives var 0), 0 off the mask; no shift-mean option "
                 "(notes/ppo.md checklist 24)", cases, dtype)


def ppo_policy_loss(dtype=F64) -> dict:
    def run(name, logprobs, old_logprobs, advantages, mask, clip):
        loss, frac = ppo.policy_loss(_t(logprobs, dtype), _t(old_logprobs, dtype), _t(advantages, dtype),
                                     _mask(mask), clip)
        return _case(name, dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                                clip=clip), dict(loss=loss, clip_fraction=frac))

    # row 0, A > 0: ratio e^0.3 = 1.35 > 1.2 (clip binds), e^-0.4 = 0.67 < 0.8 (does not), e^0.1 inside;
    # row 1, A < 0: ratio e^-0.4 < 0.8 (clip binds), e^0.3 > 1.2 (does not), e^-0.05 inside; padding junk
    old = [[-1.0, -2.0, -0.5, 0.0], [-0.5, -1.0, -2.0, -3.0]]
    new = [[-0.7, -2.4, -0.4, 50.0], [-0.9, -0.7, -2.05, -100.0]]
    adv = [[1.0, 0.5, 2.0, 9.0], [-1.0, -0.5, -2.0, 9.0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 0]]
    pm, _ = _masks_from_last([5, 3, 0], 6)
    r_old = _randn(401, 3, 6, scale=1.0)
    r_new = [[round(o + d, 6) for o, d in zip(orow, drow)] for orow, drow in zip(r_old, _randn(402, 3, 6, scale=0.25))]
    r_adv = _randn(403, 3, 6)
    cases = [
        run("both_clip_sides_bind_and_not", new, old, adv, mask, 0.2),
        run("first_epoch_ratio_one", old, old, adv, mask, 0.2),
        run("zero_advantage", new, old, [[0.0] * 4, [0.0] * 4], mask, 0.2),
        run("clip_01", new, old, adv, mask, 0.1),
        run("seeded_random", r_new, r_old, r_adv, pm, 0.2),
    ]
    return _file("minihuatuo.stages.rl.ppo.policy_loss",
                 "policy_loss(logprobs (B,R), old_logprobs (B,R), advantages (B,R), mask (B,R) bool, clip) -> "
                 "(loss (B,), clip_fraction (B,))",
                 "per-sequence token mean over the mask of max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = "
                 "exp(logprobs - old_logprobs); clip_fraction = masked mean of [clipped term > unclipped] "
                 "(Schulman et al. 2017 eq. 7; notes/ppo.md checklist 26)",
                 cases, dtype, TOL_CLIPFRAC)


def ppo_value_loss(dtype=F64) -> dict:
    def run(name, values, old_values, returns, mask, clip_value):
        loss, frac = ppo.value_loss(_t(values, dtype), _t(old_values, dtype), _t(returns, dtype), _mask(mask),
                                    clip_value)
        return _case(name, dict(values=values, old_values=old_values, returns=returns, mask=mask,
                                clip_value=clip_value), dict(loss=loss, clip_fraction=frac))

    # V_old = 0, R = 1: v = 0.5 moved past +0.2 toward R (clipped term larger: it wins), v = 0.1 inside,
    # v = -0.5 moved past -0.2 away from R (unclipped larger); row 1 moves away from R and is clipped
    values = [[0.5, 0.1, -0.5, 7.0], [1.5, 0.75, 0.3, -3.0]]
    old_values = [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.25, 0.0]]
    returns = [[1.0, 1.0, 1.0, 0.0], [0.25, 2.0, 0.5, 5.0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 0]]
    _, vm = _masks_from_last([4, 2, 0], 6)
    r_old = _randn(501, 3, 6, scale=0.5)
    r_v = [[round(o + d, 6) for o, d in zip(orow, drow)] for orow, drow in zip(r_old, _randn(502, 3, 6, scale=0.3))]
    r_ret = _randn(503, 3, 6, scale=0.7)
    cases = [
        run("both_clip_sides", values, old_values, returns, mask, 0.2),
        run("values_equal_old", old_values, old_values, returns, mask, 0.2),
        run("clip_value_1", values, old_values, returns, mask, 1.0),
        run("seeded_random", r_v, r_old, r_ret, vm, 0.2),
    ]
    return _file("minihuatuo.stages.rl.ppo.value_loss",
                 "value_loss(values (B,R), old_values (B,R), returns (B,R), mask (B,R) bool, clip_value) -> "
                 "(loss (B,), clip_fraction (B,))",
                 "per-sequence 0.5 * masked mean of max((V-R)^2, (V_old + clip(V-V_old, +-clip_value) - R)^2); "
                 "clip_fraction = masked mean of [clipped error > unclipped error] (notes/ppo.md "
                 "checklist 27)",
                 cases, dtype, TOL_CLIPFRAC)


# ----------------------------------------------------------------------------- RLOO

def rloo_sequence_rewards(dtype=F64) -> dict:
    def run(name, scores, kl, beta):
        r = rloo.sequence_rewards(_t(scores, dtype), _t(kl, dtype), beta)
        return _case(name, dict(scores=scores, kl=kl, beta=beta), dict(rewards=r))

    kl = [[0.2, 0.3, 0.0], [0.1, -0.4, 0.5]]  # already 0 off the policy mask (row 0: L = 1)
    pm, _ = _masks_from_last([4, 1, 2, 0], 5)
    rkl = [[v * m for v, m in zip(row, mrow)] for row, mrow in zip(_randn(601, 4, 5, scale=0.2), pm)]
    cases = [
        run("hand", [1.0, 0.1], kl, 0.1),
        run("official_beta", [1.0, 0.1], kl, 0.03),
        run("seeded_random", [1.0, 0.1, 0.0, 1.0], rkl, 0.05),
    ]
    return _file("minihuatuo.stages.rl.rloo.sequence_rewards",
                 "sequence_rewards(scores (B,), kl (B,R) already 0 off the policy mask, beta) -> rewards (B,)",
                 "R_i = s_i - beta * sum_t kl_t, the sequence-level k1 penalty (TRL 0.13 RLOO; paper App. F)",
                 cases, dtype)


def rloo_leave_one_out_advantages(dtype=F64) -> dict:
    def run(name, rewards, k):
        a = rloo.leave_one_out_advantages(_t(rewards, dtype), k)
        return _case(name, dict(rewards=rewards, k=k), dict(advantages=a))

    cases = [
        run("k2_two_prompts", [1.0, 0.1, 0.0, 0.1], 2),
        run("k3_two_prompts", [3.0, 1.0, 0.0, 6.0, 2.0, 9.0], 3),
        run("k4_one_prompt_equal_rewards", [0.1, 0.1, 0.1, 0.1], 4),
        run("seeded_random_k2_three_prompts", _randn(701, 6, scale=0.6), 2),
        run("seeded_random_k4_two_prompts", _randn(702, 8, scale=0.6), 4),
    ]
    return _file("minihuatuo.stages.rl.rloo.leave_one_out_advantages",
                 "leave_one_out_advantages(rewards (k*n,), k) -> advantages (k*n,); rows are k blocks of n "
                 "prompts: row i and row i + n share a prompt",
                 "A_i = R_i - (sum_{j in group} R_j - R_i)/(k-1), the leave-one-out baseline (Ahmadian et al. "
                 "2024 RLOO; TRL 0.13 layout)", cases, dtype)


def rloo_sequence_policy_loss(dtype=F64) -> dict:
    # a bound on log rho before exp, where the function has one (its default is stored with every case)
    max_log_ratio = _optional(rloo.sequence_policy_loss, "max_log_ratio")

    def run(name, logprobs, old_logprobs, advantages, mask, clip):
        kw = {} if max_log_ratio is None else {"max_log_ratio": max_log_ratio}
        loss, clipped, log_ratio = rloo.sequence_policy_loss(_t(logprobs, dtype), _t(old_logprobs, dtype),
                                                             _t(advantages, dtype), _mask(mask), clip, **kw)
        return _case(name, dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                                clip=clip, **kw), dict(loss=loss, clipped=clipped, log_ratio=log_ratio))

    mask = [[1, 1, 0]] * 4
    old = [[0.0, 0.0, 0.0]] * 4
    # Σ_t log ratio over the 2 valid tokens: 0.3, −0.4, 0.3, −0.4 with A = 1, 1, −1, −1: the four clip cases
    new = [[0.1, 0.2, 5.0], [-0.1, -0.3, -5.0], [0.1, 0.2, 9.0], [-0.1, -0.3, 7.0]]
    adv = [1.0, 1.0, -1.0, -1.0]
    # |Σ log ratio| = 107 > 100 with either sign of A; the padded slot holds −100 (new) or −100 / 0 (old)
    big_new = [[-1.0, -2.0, -100.0], [-60.0, -50.0, -100.0], [-1.0, -2.0, -100.0], [-60.0, -50.0, -100.0]]
    big_old = [[-60.0, -50.0, -100.0], [-1.0, -2.0, 0.0], [-60.0, -50.0, 0.0], [-1.0, -2.0, -100.0]]
    pm, _ = _masks_from_last([4, 2, 0, 3], 5)
    r_old = _randn(801, 4, 5)
    r_new = [[round(o + d, 6) for o, d in zip(orow, drow)] for orow, drow in zip(r_old, _randn(802, 4, 5, scale=0.15))]
    cases = [
        run("four_clip_cases_junk_padding", new, old, adv, mask, 0.2),
        run("first_epoch_ratio_one", old, old, adv, mask, 0.2),
        run("large_log_ratio_and_padding_minus_100", big_new, big_old, adv, mask, 0.2),
        run("seeded_random", r_new, r_old, [0.9, -0.4, 0.1, -1.2], pm, 0.2),
    ]
    return _file("minihuatuo.stages.rl.rloo.sequence_policy_loss",
                 "sequence_policy_loss(logprobs (B,R), old_logprobs (B,R), advantages (B,), mask (B,R) bool, "
                 "clip" + ("" if max_log_ratio is None else ", max_log_ratio") + ") -> (loss (B,), clipped (B,) "
                 "bool, log_ratio (B,))",
                 "one ratio per sequence, rho_i = exp(sum_{t in mask} (logprobs - old_logprobs))"
                 + ("" if max_log_ratio is None else ", log rho clamped at max_log_ratio before exp (log_ratio is "
                    "returned unclamped)") + "; loss_i = max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)); clipped "
                 "= clipped term > unclipped (TRL 0.13 RLOO; notes/rl_variants.md)", cases, dtype)


# ----------------------------------------------------------------------------- GRPO

def grpo_group_advantages(dtype=F64) -> dict:
    def run(name, scores, G, eps):
        a = grpo.group_advantages(_t(scores, dtype), G, eps)
        return _case(name, dict(scores=scores, G=G, eps=eps), dict(advantages=a))

    cases = [
        run("G2_with_a_zero_std_group", [1.0, 0.1, 0.1, 0.1], 2, 1e-4),
        run("G4_one_prompt", [1.0, 0.0, 0.0, 0.0], 4, 1e-4),
        run("G3_two_prompts_eps0", [1.0, 0.0, 0.1, 1.0, 0.1, 0.1], 3, 0.0),
        run("G4_two_prompts_paper_scores", [1.0, 0.1, 0.0, 1.0, 0.1, 0.1, 1.0, 0.0], 4, 1e-4),
    ]
    return _file("minihuatuo.stages.rl.grpo.group_advantages",
                 "group_advantages(scores (G*n,), G, eps) -> advantages (G*n,); rows are G blocks of n prompts",
                 "A_i = (s_i - mean_group s)/(std_group s + eps), std UNBIASED (DeepSeekMath §4.1.2 outcome "
                 "supervision; TRL GRPO)", cases, dtype)


def grpo_k3(dtype=F64) -> dict:
    has_mask = "mask" in inspect.signature(grpo.k3).parameters

    def run(name, logprobs, ref_logprobs, mask=None):
        inputs = dict(logprobs=logprobs, ref_logprobs=ref_logprobs)
        args = [_t(logprobs, dtype), _t(ref_logprobs, dtype)]
        if mask is not None:
            inputs["mask"], args = mask, args + [_mask(mask)]
        return _case(name, inputs, dict(k3=grpo.k3(*args)))

    cases = [
        run("hand", [[0.7, -0.3, -1.0, -2.5]], [[0.7, 0.0, -1.4, -0.5]]),
        run("seeded_random", _randn(901, 3, 5, scale=0.5), _randn(902, 3, 5, scale=0.5)),
        run("large_differences", [[-1.0, -60.0]], [[-60.0, -1.0]]),
    ]
    if has_mask:  # a padded slot holding −100: 0 off the mask, whatever it holds
        cases.append(run("masked_padding_minus_100", [[-0.5, -1.25, -100.0], [-2.0, -100.0, -100.0]],
                         [[-0.75, -1.0, 0.0], [-1.5, 0.0, -3.0]], [[1, 1, 0], [1, 0, 0]]))
    return _file("minihuatuo.stages.rl.grpo.k3",
                 "k3(logprobs, ref_logprobs" + (", mask=None (bool; 0 off the mask)" if has_mask else "")
                 + ") -> same shape",
                 "k3 estimator of KL(pi||pi_ref) per token: exp(d) - d - 1 with d = ref_logprobs - logprobs "
                 "(DeepSeekMath eq. 4; Schulman 2020 'Approximating KL divergence')", cases, dtype)


def grpo_loss(dtype=F64) -> dict:
    def run(name, logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, beta):
        loss, frac, kl = grpo.grpo_loss(_t(logprobs, dtype), _t(old_logprobs, dtype), _t(ref_logprobs, dtype),
                                        _t(advantages, dtype), _mask(mask), clip, beta)
        return _case(name, dict(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                advantages=advantages, mask=mask, clip=clip, beta=beta),
                     dict(loss=loss, clip_fraction=frac, mean_k3=kl))

    # row 0, A > 0: ratio 1.35 (clip binds), 0.67 (does not); row 1, A < 0: 0.67 (binds), 1.35 (not);
    # the padded slot holds junk
    new = [[0.3, -0.4, 3.0], [-0.9, -0.2, 8.0]]
    old = [[0.0, 0.0, 0.0], [-0.5, -0.5, 0.0]]
    ref = [[0.0, -0.1, 0.0], [-0.6, -0.4, 0.0]]
    mask = [[1, 1, 0], [1, 1, 0]]
    # |Σ_t log ratio| = 105 over 5 tokens (±21 each: ρ_t = e^{±21}), the reference 1 nat from the old
    # policy, and a padded slot holding −100 (new) next to a reference of 0 (exp(100) is inf in fp32)
    big_old = [[-2.0, -1.5, -3.0, -2.5, -1.0, 0.0], [-23.0, -22.5, -24.0, -23.5, -22.0, 0.0]]
    big_new = [[-23.0, -22.5, -24.0, -23.5, -22.0, -100.0], [-2.0, -1.5, -3.0, -2.5, -1.0, -100.0]]
    big_ref = [[o + 1.0 for o in big_old[0][:5]] + [0.0], [o - 1.0 for o in big_old[1][:5]] + [0.0]]
    big_mask = [[1, 1, 1, 1, 1, 0]] * 2
    pm, _ = _masks_from_last([4, 1, 3], 5)
    r_old = _randn(1001, 3, 5)
    r_new = [[round(o + d, 6) for o, d in zip(orow, drow)] for orow, drow in zip(r_old, _randn(1002, 3, 5, scale=0.2))]
    r_ref = [[round(o + d, 6) for o, d in zip(orow, drow)] for orow, drow in zip(r_old, _randn(1003, 3, 5, scale=0.3))]
    cases = [
        run("both_clip_sides_junk_padding", new, old, ref, [1.0, -1.0], mask, 0.2, 0.1),
        run("first_epoch_ratio_one", old, old, ref, [1.0, -1.0], mask, 0.2, 0.04),
        run("zero_advantage_kl_only", new, old, ref, [0.0, 0.0], mask, 0.2, 0.04),
        run("large_log_ratio_and_padding_minus_100", big_new, big_old, big_ref, [1.0, -1.0], big_mask, 0.2,
            0.04),
        run("large_log_ratio_negative_advantage", big_new, big_old, big_ref, [-1.0, 1.0], big_mask, 0.2, 0.04),
        run("seeded_random", r_new, r_old, r_ref, [0.8, -1.1, 0.3], pm, 0.2, 0.04),
    ]
    return _file("minihuatuo.stages.rl.grpo.grpo_loss",
                 "grpo_loss(logprobs (B,R), old_logprobs (B,R), ref_logprobs (B,R), advantages (B,), mask (B,R) "
                 "bool, clip, beta) -> (loss (B,), clip_fraction (B,), mean_k3 (B,))",
                 "per-sequence token mean over the mask of max(-A rho_t, -A clip(rho_t, 1-eps, 1+eps)) + beta k3_t, "
                 "rho_t = exp(logprobs - old_logprobs) (DeepSeekMath eq. 3, negated)", cases, dtype, TOL_CLIPFRAC)


# ----------------------------------------------------------------------------- DPO

def dpo_loss(dtype=F64) -> dict:
    def run(name, pc, pr, rc, rr, beta, label_smoothing):
        loss, cr, rjr = dpo.dpo_loss(_t(pc, dtype), _t(pr, dtype), _t(rc, dtype), _t(rr, dtype), beta,
                                     label_smoothing)
        return _case(name, dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, beta=beta,
                                label_smoothing=label_smoothing),
                     dict(loss=loss, chosen_reward=cr, rejected_reward=rjr))

    pc, pr, rc, rr = [-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.5, -2.0]
    g = [_randn(1101 + i, 5, scale=20.0, digits=4) for i in range(4)]
    cases = [
        run("hand_beta05", pc, pr, rc, rr, 0.5, 0.0),
        run("hand_beta05_label_smoothing01", pc, pr, rc, rr, 0.5, 0.1),
        run("paper_beta1_equal_to_reference", [-12.5, -40.0], [-30.0, -7.25], [-12.5, -40.0], [-30.0, -7.25],
            1.0, 0.0),
        run("large_margins_beta1", [-10.0, -300.0], [-300.0, -10.0], [-20.0, -200.0], [-200.0, -20.0], 1.0, 0.0),
        run("seeded_random_beta01", *g, 0.1, 0.0),
        run("seeded_random_beta01_label_smoothing03", *g, 0.1, 0.3),
    ]
    return _file("minihuatuo.stages.rl.dpo.dpo_loss",
                 "dpo_loss(policy_chosen (B,), policy_rejected (B,), ref_chosen (B,), ref_rejected (B,), beta, "
                 "label_smoothing=0) -> (loss (B,), chosen_reward (B,), rejected_reward (B,))",
                 "-(1-ls) log sigmoid(beta Delta) - ls log sigmoid(-beta Delta), Delta = (pc - rc) - (pr - rr); "
                 "rewards beta(pc - rc), beta(pr - rr) (Rafailov et al. 2023 eq. 7; cDPO label smoothing)",
                 cases, dtype)


# ----------------------------------------------------------------------------- reward rule

class _Recording:
    """The rule verifier, recording which (final response, reference) pairs it is asked about."""

    def __init__(self):
        self.inner, self.calls = RuleVerifier(), []

    def verify_batch(self, pairs):
        verdicts = self.inner.verify_batch(pairs)
        self.calls += [[r, y, v] for (r, y), v in zip(pairs, verdicts)]
        return verdicts


def reward_rule() -> dict:
    def run(name, outputs, y_stars, **cfg):
        c = RewardConfig(**cfg)
        v = _Recording()
        r = rewards(outputs, y_stars, v, c)
        return _case(name, dict(outputs=outputs, y_stars=y_stars,
                                config=dict(correct=c.correct, incorrect=c.incorrect, no_format=c.no_format,
                                            require_thinking=c.require_thinking)),
                     dict(rewards=r, verifier_calls=v.calls))

    think = "## Thinking\n\nFever, cough and consolidation on the radiograph point to a lobar infection.\n\n"
    ok = think + "## Final Response\n\nThe diagnosis is community-acquired pneumonia."
    wrong = think + "## Final Response\n\nThe diagnosis is pulmonary embolism."
    y = "Community-acquired pneumonia"
    cases = [
        run("correct", [ok], [y]),
        run("wrong_answer", [wrong], [y]),
        run("alias_accepted", [think + "## Final Response\n\nThis is a heart attack."], ["Myocardial infarction"]),
        run("hedged_answer_rejected", [think + "## Final Response\n\nIt could be pneumonia or pulmonary embolism."],
            ["Pneumonia"]),
        run("missing_final_response_header", [think + "The diagnosis is community-acquired pneumonia."], [y]),
        run("missing_thinking_header", ["## Final Response\n\nThe diagnosis is community-acquired pneumonia."], [y]),
        run("final_before_thinking", ["## Final Response\n\nCommunity-acquired pneumonia.\n\n## Thinking\n\nIt fits."],
            [y]),
        run("two_final_response_headers", [ok + "\n\n## Final Response\n\nPulmonary embolism."], [y]),
        run("empty_final_response", [think + "## Final Response\n\n   \n"], [y]),
        run("final_response_without_blank_lines", [think + "## Final Response community-acquired pneumonia"], [y]),
        run("batch_of_three", [ok, wrong, "Pneumonia."], [y, y, y]),
        run("custom_values", [ok, wrong, "Pneumonia."], [y, y, y], correct=2.0, incorrect=-0.5, no_format=-1.0),
        # issue 25: the rule verifier judges the conclusion committed to last, with exactly one candidate
        run("hack_list_of_candidates_rejected",
            [think + "## Final Response\n\nThe diagnosis is community-acquired pneumonia, pulmonary embolism, "
                     "tuberculosis."], [y]),
        run("hack_lettered_options_rejected",
            [think + "## Final Response\n\nA) pulmonary embolism B) community-acquired pneumonia"], [y]),
        run("hack_negated_then_another_answer_rejected",
            [think + "## Final Response\n\nCommunity-acquired pneumonia is ruled out. The diagnosis is pulmonary "
                     "embolism."], [y]),
        run("hack_abandoned_first_answer_rejected",
            [think + "## Final Response\n\nI first thought community-acquired pneumonia, but the answer is "
                     "pulmonary embolism."], [y]),
        run("reflection_ending_on_the_answer_accepted",
            [think + "## Final Response\n\nMy first thought was pulmonary embolism. Wait, the findings do not fit "
                     "pulmonary embolism; the answer is community-acquired pneumonia."], [y]),
        run("direct_response_ablation_no_thinking_required",
            ["## Final Response\n\nCommunity-acquired pneumonia.", "Community-acquired pneumonia.",
             think + "## Final Response\n\nPulmonary embolism.", "## Final Response\n\n"],
            [y, y, y, y], require_thinking=False),
    ]
    return _file("minihuatuo.services.reward.rewards",
                 "rewards(outputs list[str], y_stars list[str], verifier=RuleVerifier() with the default alias "
                 "list data/aliases.tsv, cfg=RewardConfig(**config)) -> list[float]",
                 "paper §3.2 reward: correct if Verifier(final response, y*), incorrect if not, no_format when "
                 "'## Thinking' then '## Final Response' (each exactly once, non-empty answer) is missing; "
                 "verifier_calls = the (final response, y*, verdict) the rule verifier was asked, in order",
                 cases, "python float (config values, no arithmetic)", TOL_EXACT)


# ----------------------------------------------------------------------------- MCQ scorer

def evaluate_extract_choice() -> dict:
    def run(name, output, options, similarity_fallback=True):
        e = extract_choice(output, dict(options), similarity_fallback)
        return _case(name, dict(output=output, options=[list(o) for o in options],
                                similarity_fallback=similarity_fallback),
                     dict(first=e.first, last=e.last, step=e.step))

    opts = [("A", "Iron deficiency"), ("B", "Iron deficiency anemia"), ("C", "Vitamin B12 deficiency"),
            ("D", "Parvovirus B19 infection"), ("E", "Folate deficiency")]
    drugs = [("A", "Amoxicillin"), ("B", "Doxycycline"), ("C", "Ceftriaxone"), ("D", "Vancomycin")]
    ten = [(chr(ord("A") + i), f"Option number {i + 1}") for i in range(10)]
    cases = [
        run("explicit_strict_letter", "After weighing the findings, the answer is C.", opts),
        run("explicit_parenthesised", "The answer is (D).", opts),
        run("explicit_lowercase_with_period", "so the answer is c.", opts),
        run("explicit_bold_colon", "Final answer: **E**", opts),
        run("explicit_first_and_last_differ", "At first the answer is A, but on reflection the answer is D.", opts),
        run("lowercase_without_punctuation_is_no_answer", "The answer is a bit unclear, maybe Folate deficiency.",
            opts),
        run("isolated_letter", "I'd pick (D).", opts),
        run("isolated_letters_first_last", "Option B, or maybe E.", opts),
        run("article_and_names_are_not_letters", "A patient with hepatitis B and vitamin D deficiency: choose C.",
            opts),
        run("pronoun_I_with_ten_options", "I think it is B. I'm sure.", ten),
        run("option_text_only", "This is iron deficiency anemia, typical of menorrhagia.", opts),
        run("option_text_longest_wins", "Iron deficiency anemia rather than folate deficiency.", opts),
        run("option_text_case_folded", "Start CEFTRIAXONE now.", drugs),
        run("difflib_fallback", "vancomicyn", drugs),
        run("difflib_fallback_off", "vancomicyn", drugs, similarity_fallback=False),
        run("final_response_split", "## Thinking\n\nThe answer is A at first glance.\n\n## Final Response\n\n"
            "The answer is B.", drugs),
        run("final_response_split_text", "## Thinking\n\nAmoxicillin? No.\n\n## Final Response\n\nDoxycycline.",
            drugs),
        run("cjk_letter", "答案是C。", opts),
        run("empty_output", "", opts),
    ]
    return _file("minihuatuo.stages.evaluate.extract_choice",
                 "extract_choice(output str, options dict (given here as [letter, text] pairs, in order), "
                 "similarity_fallback=True) -> Extraction(first, last, step)",
                 "the MCQ answer-extraction cascade of the benchmark scorer (paper §4.1; official evaluation/"
                 "scorer.py): explicit 'answer is X' > isolated letter > option text > difflib fallback, on the "
                 "text after the last '## Final Response'", cases, "str (no floats)", TOL_EXACT)


# ----------------------------------------------------------------------------- tempered log-probs

def token_logprobs_entropy(dtype=F64) -> dict:
    def run(name, logits, targets, temperature):
        lp, h = token_logprobs_and_entropy(_t(logits, dtype), torch.tensor(targets), temperature)
        return _case(name, dict(logits=logits, targets=targets, temperature=temperature),
                     dict(logprobs=lp, entropy=h))

    # row 1: a masked logit (−1e4: its probability underflows to 0 at any temperature here);
    # row 2: large logits; targets −100 (ignore label) and 5 (= V, out of range) give log-prob 0
    logits = [[2.0, 1.0, 0.5, -1.0, 0.0], [3.0, -10000.0, 0.25, 0.25, -2.0], [100.0, 95.0, 99.5, 0.0, -50.0],
              [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 0.25, 2.0]]
    targets = [0, 2, 1, -100, 5]
    g = torch.Generator().manual_seed(1201)
    rnd = [[[round(v, 6) for v in row] for row in block]
           for block in (torch.randn(2, 2, 7, generator=g, dtype=F64) * 3).tolist()]
    rtg = [[6, 0], [3, 7]]
    cases = []
    for T in (1.0, 0.7, 0.5):
        cases.append(run(f"hand_T{T}", logits, targets, T))
    for T in (1.0, 0.7, 0.5):
        cases.append(run(f"seeded_random_batch_dims_T{T}", rnd, rtg, T))
    return _file("minihuatuo.engine.reference_kernels.token_logprobs_and_entropy",
                 "token_logprobs_and_entropy(logits (..., V), targets (...) int, temperature) -> (logprobs (...), "
                 "entropy (...))",
                 "log softmax(logits/T)[target] (0 for a target outside [0, V)) and the entropy of softmax(logits/T) "
                 "with p log p = 0 where p = 0 (notes/ppo.md tempered log-prob, checklist 6-7)",
                 cases, dtype)


# ----------------------------------------------------------------------------- the files

GENERATORS = {
    "ppo_per_token_rewards": ppo_per_token_rewards,
    "ppo_gae": ppo_gae,
    "ppo_masked_whiten": ppo_masked_whiten,
    "ppo_policy_loss": ppo_policy_loss,
    "ppo_value_loss": ppo_value_loss,
    "rloo_sequence_rewards": rloo_sequence_rewards,
    "rloo_leave_one_out_advantages": rloo_leave_one_out_advantages,
    "rloo_sequence_policy_loss": rloo_sequence_policy_loss,
    "grpo_group_advantages": grpo_group_advantages,
    "grpo_k3": grpo_k3,
    "grpo_loss": grpo_loss,
    "dpo_loss": dpo_loss,
    "reward_rule": reward_rule,
    "evaluate_extract_choice": evaluate_extract_choice,
    "token_logprobs_entropy": token_logprobs_entropy,
}
# the generators whose math also runs in float32 (the others have no float arithmetic)
FLOAT_GENERATORS = [k for k in GENERATORS if k not in ("reward_rule", "evaluate_extract_choice")]


def non_finite(x, path="") -> list[str]:
    """Paths of every NaN / inf in a nested structure."""
    if isinstance(x, float):
        return [] if math.isfinite(x) else [path]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in non_finite(v, f"{path}.{k}")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in non_finite(v, f"{path}[{i}]")]
    return []


def _format(x, indent: int) -> str:
    """JSON with one line per row: objects and lists of lists are broken over lines, lists of scalars
    are not."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(x, dict) and x:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_format(v, indent + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, list) and any(isinstance(v, (list, dict)) for v in x):
        return "[\n" + ",\n".join(inner + _format(v, indent + 1) for v in x) + "\n" + pad + "]"
    return json.dumps(x, ensure_ascii=False, allow_nan=False)


def dumps(content: dict) -> str:
    """The file's text. Floats are written as Python's repr: the shortest text that reads back as the
    same float64 (at most 17 significant digits). NaN and inf are refused (they are not JSON)."""
    return _format(content, 0) + "\n"


def generate(name: str) -> dict:
    content = GENERATORS[name]()
    bad = [f"{c['name']}{p}" for c in content["cases"] for p in non_finite(c, "")]
    if bad:
        raise ValueError(f"{name}: non-finite values in " + ", ".join(bad))
    return content


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite notes/vectors/*.json from the code")
    args = ap.parse_args(argv)
    differ = []
    for name in GENERATORS:
        path = VECTOR_DIR / f"{name}.json"
        text = dumps(generate(name))
        if args.write:
            VECTOR_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
        elif not path.exists() or path.read_text(encoding="utf-8") != text:
            differ.append(name)
            print(f"differs: {path.relative_to(ROOT)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

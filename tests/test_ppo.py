"""PPO: the math against hand-computed values and plain loops, the masks and score slot of the spec,
learning on a toy verifiable task over 3 seeds, and exact resume. Numbers refer to the PPO checklist in
notes/ppo.md; tests/test_ppo_checklist.py checks the official preset's behaviour item by item."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import COLORS

from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.verifier import ExactMatchVerifier
from minihuatuo.stages.rl import ppo_run
from minihuatuo.stages.rl.ppo import (
    PRESETS,
    PPOConfig,
    gae,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from minihuatuo.stages.rl.rollout import masks_from_last, response_logprobs, rollout, truncate_after_stop
from minihuatuo.training.schedules import warmup_from_zero_linear_lr


def test_learning_rate_official_schedule():
    c = PRESETS["official"]  # 157 updates, warmup ceil(0.05 * 157) = 8, stepped once per update (checklist 33)
    assert warmup_from_zero_linear_lr(0, 157, c) == 0.0  # update 1 trains at lr 0
    assert warmup_from_zero_linear_lr(7, 157, c) == pytest.approx(5e-7 * 7 / 8)
    assert warmup_from_zero_linear_lr(8, 157, c) == pytest.approx(5e-7)
    assert warmup_from_zero_linear_lr(156, 157, c) == pytest.approx(5e-7 * 1 / 149)


def test_truncation_keeps_the_first_stop_token_and_masks():
    STOP, PAD = 9, 0
    tokens = torch.tensor([[5, 9, 7, 9, 3],   # stop at 1: later stop and tokens become padding
                           [5, 6, 7, 8, 3],   # no stop: L = R - 1
                           [5, 6, 7, 8, 9]])  # stop at the last slot
    out, last, has_stop = truncate_after_stop(tokens, [STOP], PAD)
    assert out.tolist() == [[5, 9, 0, 0, 0], [5, 6, 7, 8, 3], [5, 6, 7, 8, 9]]
    assert last.tolist() == [1, 4, 4] and has_stop.tolist() == [True, False, True]
    policy, value = masks_from_last(last, 5)
    assert policy.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]  # t <= L (checklist 9)
    assert value.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]  # t <= L + 1


def test_score_lands_on_the_right_slot_and_kl_is_zero_where_policy_equals_reference():
    last = torch.tensor([1, 4, 4])  # stop in the middle / no stop / stop at the last slot
    policy, _ = masks_from_last(last, 5)
    lp = torch.randn(3, 5) * policy
    scores = torch.tensor([1.0, 0.1, 0.0])
    r, kl = per_token_rewards(lp, lp.clone(), scores, policy, last, beta=0.03, score_slot="after_stop")
    assert torch.equal(kl, torch.zeros(3, 5))  # π == π_ref → no penalty anywhere
    expected = torch.zeros(3, 5)
    expected[0, 2] = 1.0  # one slot past the stop token (checklist 19)
    expected[1, 4] = 0.1  # no stop: on the last token
    expected[2, 4] = 0.0  # stop at the last slot: on it
    assert torch.equal(r, expected)
    r_last, _ = per_token_rewards(lp, lp.clone(), scores, policy, last, beta=0.03, score_slot="last")
    assert r_last[0, 1] == 1.0 and r_last[0, 2] == 0.0
    ref = lp - 0.5 * policy  # log π − log π_ref = 0.5 on every valid token
    r2, kl2 = per_token_rewards(lp, ref, torch.zeros(3), policy, last, beta=0.03, score_slot="after_stop")
    assert torch.allclose(r2, -0.03 * 0.5 * policy.float())  # −β k1, nothing off the policy mask (checklist 18)


def _gae_reference(rewards, values, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k}, written as an explicit double sum (independent of the backward loop)."""
    B, R = rewards.shape
    nxt = torch.cat([values[:, 1:], torch.zeros(B, 1)], 1)
    delta = rewards + gamma * nxt - values
    out = torch.zeros(B, R)
    for b in range(B):
        for t in range(R):
            out[b, t] = sum((gamma * lam) ** k * delta[b, t + k] for k in range(R - t))
    return out


def test_gae_equals_a_plain_sum_with_padding():
    g = torch.Generator().manual_seed(0)
    last = torch.tensor([2, 6, 0, 5])
    _, value_mask = masks_from_last(last, 7)
    rewards = torch.randn(4, 7, generator=g) * value_mask
    values = torch.randn(4, 7, generator=g) * value_mask  # zeroed beyond L + 1 (checklist 22)
    torch.testing.assert_close(gae(rewards, values, 1.0, 0.95), _gae_reference(rewards, values, 1.0, 0.95))
    torch.testing.assert_close(gae(rewards, values, 0.9, 0.8), _gae_reference(rewards, values, 0.9, 0.8))


def test_gae_consequences_listed_in_the_spec():
    # V ≡ 0, β = 0: an EOS-terminated response gets A_{L+1} = s, A_L = 0.95 s, A_{L-k} = 0.95^{k+1} s;
    # a response truncated without EOS gets A_L = s (notes/ppo.md checklist 19, 21).
    last = torch.tensor([2, 4])
    policy, _ = masks_from_last(last, 5)
    r, _ = per_token_rewards(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([1.0, 1.0]), policy, last, 0.0,
                             "after_stop")
    a = gae(r, torch.zeros(2, 5), 1.0, 0.95)
    torch.testing.assert_close(a[0], torch.tensor([0.95 ** 3, 0.95 ** 2, 0.95, 1.0, 0.0]))
    torch.testing.assert_close(a[1], torch.tensor([0.95 ** 4, 0.95 ** 3, 0.95 ** 2, 0.95, 1.0]))


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, var = valid.mean(), valid.var(unbiased=True)  # checklist 24: unbiased, valid tokens only
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w[mask], (valid - mean) / torch.sqrt(var + 1e-8))
    assert torch.equal(w[~mask], torch.zeros(3))
    x2 = x.clone()
    x2[~mask] = 1e6  # padding values change nothing
    torch.testing.assert_close(masked_whiten(x2, mask), w)


def test_policy_and_value_losses_by_hand_both_clip_sides():
    # 3 tokens; ratios e^{0.3} = 1.35 (above 1.2), e^{-0.4} = 0.67 (below 0.8), e^{0.1} = 1.105 (inside)
    new = torch.tensor([[0.3, -0.4, 0.1]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac = policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: A>0, ρ=1.35 → max(−1.35, −1.2) = −1.2 (clipped wins)
    # token 2: A>0, ρ=0.67 → max(−0.670, −0.8) = −0.670 (unclipped)
    # token 3: A<0, ρ=1.105 → max(2.210, 2.210) = 2.210 (inside the clip range: equal)
    hand = (-1.2 + -math.exp(-0.4) + 2 * math.exp(0.1)) / 3
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    # A<0 with ρ below the range: max(−A ρ, −A·0.8) picks the clipped side
    l2, c2 = policy_loss(torch.tensor([[-0.4]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), mask[:, :1], 0.2)
    assert l2.item() == pytest.approx(0.8) and c2.item() == 1.0
    # value: V_old = 0, returns 1; v = 0.5 (clipped to 0.2) and v = 0.1 (inside), v = −0.5 (clipped to −0.2)
    v = torch.tensor([[0.5, 0.1, -0.5]])
    vl, vclip = value_loss(v, torch.zeros(1, 3), torch.ones(1, 3), mask, clip_value=0.2)
    # max((0.5−1)², (0.2−1)²) = 0.64; (0.1−1)² = 0.81; max((−0.5−1)², (−0.2−1)²) = 2.25
    assert vl.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert vclip.item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- toy task end to end

def toy_cfg(seed=0, updates=15, **kw):
    base = dict(response_length=64, max_prompt_length=64, temperature=1.0, early_stop=True, batch_size=32,
                micro_batch_size=32, ppo_epochs=2, total_episodes=32 * updates, lr=3e-4, warmup_ratio=0.0,
                vf_coef=0.5, beta=0.01, save_every=0, seed=seed, value_head="shared",
                drop_last=False)  # 4 problems, 32 rollouts per update: a batch repeats prompts
    base.update(kw)
    return PPOConfig(**base)


def test_sampler_logprobs_equal_a_fresh_forward(toy):
    """Old log-probs come from the sampler (checklist 6, 35); a forward of the same policy agrees."""
    tok = Tokenizer.from_dir(toy / "sft" / "final")
    model = load_model(toy / "sft" / "final").eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Say {c}."}]) for c in COLORS]
    ro = rollout(model, tok, prompts, 0.7, 64, tok.eos_ids, early_stop=True, seed=0)
    with torch.no_grad():
        fresh = response_logprobs(model, ro, 0.7)
    torch.testing.assert_close(fresh * ro.policy_mask, ro.logprobs, atol=1e-4, rtol=0)
    assert ro.has_stop.all()  # the SFT model closes its turn


def test_policy_and_reference_start_equal_and_the_reference_is_frozen(toy):
    ac, ref = ppo_run.build_models(toy_cfg(value_head="separate"), toy / "sft" / "final", None, "cpu")
    for (n, p), (_, q) in zip(ac.policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad, n  # checklist 1
    assert ac.critic.lm_head is None and ac.critic.score.weight.shape == (1, 64)  # fresh C → 1 head (checklist 2)
    assert ac.critic.score.bias is None and abs(ac.critic.score.weight.std().item() - 0.02) < 0.01


def test_ppo_raises_the_verifier_score_over_three_seeds(toy):
    gains = []
    for seed in range(3):
        h = ppo_run.train(toy_cfg(seed=seed), toy / "sft" / "final", toy / "problems.json", toy / f"run{seed}",
                            ExactMatchVerifier())
        start = sum(m["score"] for m in h[:3]) / 3
        end = sum(m["score"] for m in h[-3:]) / 3
        gains.append(end - start)
        assert max(m["kl_k1"] for m in h) < 10.0  # the policy stays near the reference
    assert min(gains) > 0.1, gains  # measured: score ~0.2 → 0.45–0.6 in 15 updates


def test_resume_after_a_crash_gives_the_same_metrics(toy, monkeypatch):
    straight = ppo_run.train(toy_cfg(updates=4, save_every=2), toy / "sft" / "final", toy / "problems.json",
                               toy / "straight", ExactMatchVerifier())
    real_update = ppo_run.update

    def crash_in_update_3(u, *a, **k):
        if u == 2:
            raise KeyboardInterrupt("killed during update 3")
        return real_update(u, *a, **k)

    monkeypatch.setattr(ppo_run, "update", crash_in_update_3)
    with pytest.raises(KeyboardInterrupt):
        ppo_run.train(toy_cfg(updates=4, save_every=2), toy / "sft" / "final", toy / "problems.json",
                        toy / "crashed", ExactMatchVerifier())
    monkeypatch.undo()
    resumed = ppo_run.train(toy_cfg(updates=4, save_every=2), toy / "sft" / "final", toy / "problems.json",
                              toy / "crashed", ExactMatchVerifier(), resume=True)
    assert [m["update"] for m in resumed] == [3, 4]
    drop = ("time_rollout", "time_ref_value", "time_reward", "time_optimize")
    for a, b in zip(straight[2:], resumed):
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    wa = load_model(toy / "straight" / "final" / "policy").state_dict()
    wb = load_model(toy / "crashed" / "final" / "policy").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_make_the_same_update_as_one(toy, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("ppo_ddp_worker.py")
    results = []
    for n in (1, 2):
        out = tmp_path / f"w{n}.safetensors"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                            str(worker), str(toy), str(out)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(load_file(out))
    one, two = results
    start = load_model(toy / "sft" / "final").state_dict()
    assert any(not torch.equal(one[f"policy.{k}"], v) for k, v in start.items())  # the update did something
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4)


def test_kernels_switch_gives_the_same_update(toy, cpu_kernels):
    """PPOConfig.kernels fuses the LM head with log-prob + entropy (and RMSNorm/SwiGLU/RoPE); learning
    from the same experience must give the same weights as the reference path (issue 7, point 5).
    `cpu_kernels` asserts that the compiled kernels built: without it, a machine with no compiler
    would compare the reference with itself and pass whatever the kernels do."""
    from minihuatuo.services.formats import read_problems
    from minihuatuo.services.reward import RewardConfig
    from minihuatuo.stages.rl.ppo import collect, learn
    from minihuatuo.stages.rl.ppo_run import build_models
    from minihuatuo.training.distributed import Dist

    weights = []
    for fused in (False, True):
        cfg = toy_cfg(value_head="separate", kernels=fused, micro_batch_size=8)
        ac, ref = build_models(cfg, toy / "sft" / "final", None, "cpu")
        tok = Tokenizer.from_dir(toy / "sft" / "final")
        exp = collect(0, toy_cfg(value_head="separate"), ac, ref, tok, read_problems(toy / "problems.json"),
                      ExactMatchVerifier(), Dist(), RewardConfig(), {})  # the same experience both times
        ac.policy.use_kernels = ac.critic.use_kernels = fused
        # SGD, not Adam: Adam divides by sqrt(v), which turns fp32 rounding in near-zero gradients into
        # lr-sized steps; with SGD the weights differ exactly by lr × the gradient difference
        opt = torch.optim.SGD(ac.parameters(), lr=1.0)
        learn(0, cfg, ac, opt, exp)
        weights.append({k: v.detach().clone() for k, v in ac.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=2e-5, rtol=1e-4)


def _experience(toy, cfg):
    from minihuatuo.services.formats import read_problems
    from minihuatuo.services.reward import RewardConfig
    from minihuatuo.stages.rl.ppo import collect
    from minihuatuo.stages.rl.ppo_run import build_models
    from minihuatuo.training.distributed import Dist

    ac, ref = build_models(cfg, toy / "sft" / "final", None, "cpu")
    tok = Tokenizer.from_dir(toy / "sft" / "final")
    exp = collect(0, cfg, ac, ref, tok, read_problems(toy / "problems.json"), ExactMatchVerifier(), Dist(),
                  RewardConfig(), {})
    return ac, ref, exp


def test_length_sorted_trimmed_chunks_give_the_full_forward_numbers(toy):
    """collect() runs the reference and the critic on chunks of similar length cut to their longest
    response (rollout.trim); log π_ref and V_old must equal one forward over all response slots."""
    from minihuatuo.stages.rl.rollout import response_values

    cfg = toy_cfg(value_head="separate", micro_batch_size=5, temperature=1.5)
    ac, ref, exp = _experience(toy, cfg)
    ro = exp.ro
    assert int(ro.last.max()) - int(ro.last.min()) >= 3  # rows of different lengths: chunks were cut
    assert int(ro.last.min()) + 2 < ro.response.shape[1]
    with torch.no_grad():
        full_ref = response_logprobs(ref, ro, cfg.temperature) * ro.policy_mask
        full_v = response_values(ac.critic, ro) * ro.value_mask
    torch.testing.assert_close(exp.ref_logprobs, full_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.old_values, full_v, atol=1e-5, rtol=0)


def test_micro_batch_size_does_not_change_the_update(toy):
    """Micro-batches are gradient accumulation inside one minibatch: sorted by length and cut to
    their longest response or not, the update is the same sum of per-sequence losses."""
    from minihuatuo.stages.rl.ppo import learn

    weights = []
    for micro in (32, 3):
        cfg = toy_cfg(value_head="separate", micro_batch_size=micro, temperature=1.5)
        torch.manual_seed(0)
        ac, _, exp = _experience(toy, toy_cfg(value_head="separate", temperature=1.5))
        opt = torch.optim.SGD(ac.parameters(), lr=1.0)  # see test_kernels_switch_gives_the_same_update
        learn(0, cfg, ac, opt, exp)
        weights.append({k: v.detach().clone() for k, v in ac.state_dict().items()})
    start = load_model(toy / "sft" / "final").state_dict()
    assert any(not torch.equal(weights[0][f"policy.{k}"], v) for k, v in start.items())
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=2e-5, rtol=1e-4)

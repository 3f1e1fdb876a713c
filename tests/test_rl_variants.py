"""The stage-2 comparison variants (issue 6, notes/rl_variants.md, checklist 37–38 of notes/ppo.md): RLOO, GRPO and DPO.
Hand-computed values for every formula, then learning on the `toy` task (conftest.py)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from minihuatuo import cli
from minihuatuo.engine.checkpoint import load_model
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.formats import read_problems
from minihuatuo.services.records import FormatError
from minihuatuo.services.reward import RewardConfig, extract_final_response
from minihuatuo.services.verifier import ExactMatchVerifier, exact_match
from minihuatuo.stages.rl import dpo, grpo, rloo
from minihuatuo.stages.rl import rollout as rl


@pytest.fixture(autouse=True)
def one_thread():
    """The toy model gains nothing from intra-op threads, and on a shared 2-core machine a second thread
    that waits for a busy core makes each tiny op wait with it (measured: 12 toy updates took 2-3 s with
    one thread, 2-100 s with two, depending on the other load). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- RLOO by hand


def test_rloo_official_preset_is_ppo_plus_k2(toy, monkeypatch):
    """Paper App. F: RLOO with "parameters identical to PPO" and k = 2 (checklist 37). Every knob RLOO
    shares with PPO has PPO's official value; and one official update (sizes shrunk) samples each
    prompt exactly twice, in blocks, and steps the optimizer once per PPO epoch."""
    import dataclasses

    from minihuatuo.stages.rl.ppo import PRESETS as PPO_PRESETS
    from minihuatuo.training.distributed import Dist

    c, ppo = rloo.PRESETS["official"], PPO_PRESETS["official"]
    shared = {f.name for f in dataclasses.fields(c)} & {f.name for f in dataclasses.fields(ppo)}
    assert len(shared) >= 15 and all(getattr(c, n) == getattr(ppo, n) for n in shared), \
        {n: (getattr(c, n), getattr(ppo, n)) for n in shared if getattr(c, n) != getattr(ppo, n)}
    with pytest.raises(ValueError, match="rloo_k"):
        rloo.RLOOConfig(rloo_k=1)
    with pytest.raises(ValueError, match="multiple"):
        rloo.RLOOConfig(rloo_k=3, batch_size=128)

    prompts_seen = []
    real = rl.rollout
    monkeypatch.setattr(rl, "rollout", lambda *a, **k: prompts_seen.append(a[2]) or real(*a, **k))
    small = dataclasses.replace(c, response_length=8, max_prompt_length=64, batch_size=8, micro_batch_size=8,
                                total_episodes=8)
    policy = load_model(toy / "sft" / "final")
    ref = load_model(toy / "sft" / "final").requires_grad_(False)
    steps = []
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    monkeypatch.setattr(opt, "step", lambda *a, **k: steps.append(1))
    rloo.update(0, 1, small, policy, ref, Tokenizer.from_dir(toy / "sft" / "final"),
                read_problems(toy / "problems.json"), ExactMatchVerifier(), opt, Dist(), RewardConfig())
    (rows,) = prompts_seen
    assert len(rows) == 8 and rows[:4] == rows[4:] and len({tuple(r) for r in rows[:4]}) == 4  # k = 2 blocks
    assert len(steps) == 3  # one optimizer step per PPO epoch


def test_leave_one_out_baseline_by_hand():
    # k = 2, rows = 2 blocks of 2 prompts: row i and row i + 2 are the same prompt
    r = torch.tensor([1.0, 0.1, 0.0, 0.1])
    torch.testing.assert_close(rloo.leave_one_out_advantages(r, 2), torch.tensor([1.0, 0.0, -1.0, 0.0]))
    # k = 3: prompt a = rows 0, 2, 4 with R = 3, 0, 2; prompt b = rows 1, 3, 5 with R = 1, 6, 9
    r = torch.tensor([3.0, 1.0, 0.0, 6.0, 2.0, 9.0])
    # row 0: b = (0 + 2)/2 = 1 → 2;  row 2: b = (3 + 2)/2 → −2.5;  row 4: b = (3 + 0)/2 → 0.5
    # row 1: b = (6 + 9)/2 → −6.5;   row 3: b = (1 + 9)/2 → 1;     row 5: b = (1 + 6)/2 → 5.5
    a = rloo.leave_one_out_advantages(r, 3)
    torch.testing.assert_close(a, torch.tensor([2.0, -6.5, -2.5, 1.0, 0.5, 5.5]))
    torch.testing.assert_close(a.view(3, 2).sum(0), torch.zeros(2))  # advantages of a group sum to 0


def test_sequence_reward_sums_the_kl_over_valid_tokens():
    kl = torch.tensor([[0.2, 0.3, 0.0], [0.1, -0.4, 0.5]])  # already 0 off the policy mask (row 0: L = 1)
    R = rloo.sequence_rewards(torch.tensor([1.0, 0.1]), kl, beta=0.1)
    torch.testing.assert_close(R, torch.tensor([1.0 - 0.1 * 0.5, 0.1 - 0.1 * 0.2]))


def test_sequence_level_ratio_and_clip_by_hand():
    mask = torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool)
    old = torch.zeros(4, 3)
    # Σ_t (new − old) over the 2 valid tokens: 0.3, −0.4, 0.3, −0.4; the padded slot holds junk that must not
    # count
    new = torch.tensor([[0.1, 0.2, 5.0], [-0.1, -0.3, -5.0], [0.1, 0.2, 9.0], [-0.1, -0.3, 7.0]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped, log_ratio = rloo.sequence_policy_loss(new, old, adv, mask, clip=0.2)
    torch.testing.assert_close(log_ratio, torch.tensor([0.3, -0.4, 0.3, -0.4]))
    up, down = math.exp(0.3), math.exp(-0.4)  # 1.35 (above 1.2) and 0.67 (below 0.8)
    # A > 0: max(−ρ, −clip ρ): ρ = 1.35 → −1.2 (clipped wins); ρ = 0.67 → −0.67 (unclipped)
    # A < 0: max(ρ, clip ρ):   ρ = 1.35 → 1.35 (unclipped);     ρ = 0.67 → 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([-1.2, -down, up, 0.8]))
    assert clipped.tolist() == [True, False, False, True]
    loss.sum().backward()
    # a clipped sequence gives no gradient; an unclipped one −A ρ on each of its valid tokens, 0 on padding
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0, 0.0], [-down, -down, 0.0], [up, up, 0.0],
                                                       [0.0, 0.0, 0.0]]))


def test_sequence_ratio_stays_finite_past_fp32_overflow():
    """Σ_t log ρ_t over a long reply passes 88.7 easily once the policy has moved; exp then overflows
    fp32. The clamp at MAX_LOG_RATIO keeps loss and gradient finite (issue 17, point 7), and below the
    bound the numbers are TRL's (the test above)."""
    mask = torch.ones(2, 100, dtype=torch.bool)
    old = torch.zeros(2, 100)
    new = torch.full((2, 100), 1.0, requires_grad=True)  # Σ log ρ = 100 > 88.7 in both rows
    loss, clipped, log_ratio = rloo.sequence_policy_loss(new, old, torch.tensor([1.0, -1.0]), mask, clip=0.2)
    assert log_ratio.tolist() == [100.0, 100.0]  # reported unclamped
    bound = math.exp(rloo.MAX_LOG_RATIO)
    # A > 0: the clipped branch −1.2 wins; A < 0: ρ itself, clamped at e^20
    torch.testing.assert_close(loss, torch.tensor([-1.2, bound]))
    loss.sum().backward()
    assert torch.isfinite(new.grad).all()
    assert new.grad.abs().max() == 0.0  # beyond the bound the gradient is cut (A > 0: already 0 in TRL)
    new2 = torch.full((1, 100), 0.15, requires_grad=True)  # Σ = 15 < 20: TRL's gradient exactly, ρ·|A| per token
    rloo.sequence_policy_loss(new2, old[:1], torch.tensor([-1.0]), mask[:1], clip=0.2)[0].sum().backward()
    torch.testing.assert_close(new2.grad, torch.full((1, 100), math.exp(15.0)), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- GRPO by hand

def test_group_advantages_by_hand():
    eps = 1e-4
    # G = 2 blocks of 2 prompts: prompt a = rows 0, 2 (1, 0.1); prompt b = rows 1, 3 (0.1, 0.1)
    a = grpo.group_advantages(torch.tensor([1.0, 0.1, 0.1, 0.1]), 2, eps)
    std = 0.9 / math.sqrt(2)  # unbiased std of {1, 0.1}
    torch.testing.assert_close(a, torch.tensor([0.45 / (std + eps), 0.0, -0.45 / (std + eps), 0.0]))
    # G = 4, one prompt: scores 1, 0, 0, 0 → mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps)
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + eps))


def test_grpo_loss_by_hand_with_k3():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    new = torch.tensor([[0.3, -0.4, 3.0]], requires_grad=True)  # the padded slot must not count
    old, ref = torch.zeros(1, 3), torch.zeros(1, 3)
    loss, clipfrac, kl = grpo.grpo_loss(new, old, ref, torch.tensor([1.0]), mask, clip=0.2, beta=0.1)
    k3_1 = math.exp(-0.3) + 0.3 - 1  # π_ref/π − log(π_ref/π) − 1 with log(π_ref/π) = −0.3
    k3_2 = math.exp(0.4) - 0.4 - 1
    # token 1: ρ = 1.35, A = 1 → −1.2 (clipped); token 2: ρ = 0.67 → −0.67 (unclipped); token mean
    hand = ((-1.2 + 0.1 * k3_1) + (-math.exp(-0.4) + 0.1 * k3_2)) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5) and kl.item() == pytest.approx((k3_1 + k3_2) / 2, abs=1e-6)
    assert grpo.k3(torch.tensor([0.7]), torch.tensor([0.7])).item() == 0.0  # no KL where π = π_ref
    # with A = 0 only the KL term acts: its gradient pulls each log-prob back toward the reference
    new2 = torch.tensor([[0.3, -0.4, 0.0]], requires_grad=True)
    grpo.grpo_loss(new2, old, ref, torch.tensor([0.0]), mask, 0.2, 0.1)[0].sum().backward()
    torch.testing.assert_close(new2.grad, torch.tensor([[0.1 * (1 - math.exp(-0.3)) / 2,
                                                         0.1 * (1 - math.exp(0.4)) / 2, 0.0]]))
    assert new2.grad[0, 0] > 0 > new2.grad[0, 1]  # descent lowers the raised log-prob and raises the lowered one


def test_grpo_loss_is_finite_with_a_very_unlikely_padding_slot():
    """A padding slot may hold log π = −100 (after temperature, any value): k3 there exponentiates
    ref − new = 100, which is inf in fp32, and a mask applied after exp gives inf·0 = NaN. The mask goes
    before exp (issue 17, point 6): loss and gradient equal those with a harmless padding value."""
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    old, ref = torch.zeros(1, 3), torch.zeros(1, 3)
    results = []
    for pad in (-100.0, 0.0):
        new = torch.tensor([[0.3, -0.4, pad]], requires_grad=True)
        loss, clipfrac, kl = grpo.grpo_loss(new, old, ref, torch.tensor([1.0]), mask, clip=0.2, beta=0.1)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(kl).all() and torch.isfinite(new.grad).all(), pad
        results.append((loss.detach(), kl.detach(), new.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][2][0, 2] == 0.0  # no gradient into the padding slot


# ----------------------------------------------------------------------------- DPO by hand

def test_make_pairs():
    s = [0.1, 1.0, 0.0, 1.0, 1.0]  # verified: 1, 3, 4; not verified: 0 (wrong answer), 2 (no format)
    assert dpo.make_pairs(s, 1.0, 0) == [(1, 0), (3, 2)]  # disjoint, in sample order
    assert dpo.make_pairs(s, 1.0, 1) == [(1, 0)]
    assert dpo.make_pairs([1.0] * 5, 1.0, 0) == [] and dpo.make_pairs([0.1, 0.0], 1.0, 0) == []  # discarded


def test_dpo_loss_by_hand_and_its_gradient_sign():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)  # log π(y_w)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)  # log π(y_l)
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    # Δ_1 = (−1 + 1.5) − (−2 + 1.5) = 1;  Δ_2 = (−3 + 2) − (−1 + 2) = −2
    loss, r_w, r_l = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))]))
    torch.testing.assert_close(r_w, torch.tensor([0.25, -0.5]))
    torch.testing.assert_close(r_l, torch.tensor([-0.25, 0.5]))
    loss.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # ∂L/∂log π(y_w) = −β σ(−βΔ) < 0: descent raises the chosen log-prob and lowers the rejected one
    torch.testing.assert_close(pc.grad, torch.tensor([-0.5 * sig(-0.5), -0.5 * sig(1.0)]))
    torch.testing.assert_close(pr.grad, -pc.grad)
    ls, *_ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert ls[0].item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))


def test_dpo_paper_preset_samples_five_per_problem_and_uses_beta_one(toy, tmp_path):
    """Paper App. F (checklist 38): N = 5 offline samples per question, verifier-labelled pairs, β = 1.
    The `paper` preset with only the lengths shrunk: each problem's record holds 5 scored samples and
    its pairs join a verified and an unverified one; the loss on the preset's β is −log σ(1 · margin)."""
    c = dataclasses.replace(dpo.PRESETS["paper"], response_length=48, max_prompt_length=64)
    stats = dpo.build_pairs(c, load_model(toy / "sft" / "final"), Tokenizer.from_dir(toy / "sft" / "final"),
                            read_problems(toy / "problems.json"), ExactMatchVerifier(), tmp_path / "pairs.jsonl",
                            progress=False)
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["problems"] == len(records) == 4
    assert all(len(r["responses"]) == len(r["scores"]) == 5 for r in records)
    assert any(r["pairs"] for r in records)
    assert all(r["scores"][w] == 1.0 != r["scores"][lo] for r in records for w, lo in r["pairs"])
    margin = (-1.0 - -3.0) - (-2.0 - -2.5)  # (log π_w − log π_ref,w) − (log π_l − log π_ref,l) = 1.5
    loss = dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]),
                        beta=c.beta)[0]
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6) and margin == 1.5


# ----------------------------------------------------------------------------- the toy task


def toy_kw(seed, updates):
    return dict(response_length=64, max_prompt_length=64, temperature=1.0, early_stop=True, batch_size=32,
                micro_batch_size=32, ppo_epochs=2, total_episodes=32 * updates, lr=3e-4, warmup_ratio=0.0,
                save_every=0, seed=seed, drop_last=False)  # 4 problems: a batch repeats prompts


def _gains(module, cfgs, toy, tmp_path):
    gains, kls = [], []
    for cfg in cfgs:
        h = module.train(cfg, toy / "sft" / "final", toy / "problems.json", tmp_path / f"run{cfg.seed}",
                         ExactMatchVerifier())
        gains.append(sum(m["score"] for m in h[-3:]) / 3 - sum(m["score"] for m in h[:3]) / 3)
        kls.append(max(m["kl_k1"] for m in h))
    return gains, kls


UPDATES = 12


def test_rloo_raises_the_verifier_score_over_three_seeds(toy, tmp_path):
    cfgs = [rloo.RLOOConfig(rloo_k=2, beta=0.01, **toy_kw(seed, UPDATES)) for seed in range(3)]
    gains, kls = _gains(rloo, cfgs, toy, tmp_path)
    assert max(kls) < 10.0, kls  # the policy stays near the reference (sequence KL, k1, nats)
    assert min(gains) > 0.1, gains


def test_grpo_raises_the_verifier_score_over_three_seeds(toy, tmp_path):
    cfgs = [grpo.GRPOConfig(group_size=4, beta=0.04, **{**toy_kw(seed, UPDATES), "lr": 5e-4}) for seed in range(3)]
    gains, kls = _gains(grpo, cfgs, toy, tmp_path)
    assert max(kls) < 10.0, kls
    assert min(gains) > 0.1, gains


@pytest.mark.parametrize("module", [rloo, grpo], ids=["rloo", "grpo"])
def test_resume_gives_the_same_updates(module, toy, tmp_path):
    """Prompts, samples and minibatch orders are functions of (seed, update): stopping after update 2
    and resuming from checkpoint-2 reproduces updates 3–4 and the final weights exactly."""
    kw = {**toy_kw(0, 4), "batch_size": 8, "micro_batch_size": 8, "total_episodes": 32, "save_every": 2}
    cfg = rloo.RLOOConfig(**kw) if module is rloo else grpo.GRPOConfig(group_size=2, **kw)
    args = (toy / "sft" / "final", toy / "problems.json")
    straight = module.train(cfg, *args, tmp_path / "straight", ExactMatchVerifier())
    module.train(cfg, *args, tmp_path / "stopped", ExactMatchVerifier(), max_updates=2)
    resumed = module.train(cfg, *args, tmp_path / "stopped", ExactMatchVerifier(), resume=True)
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert [m["update"] for m in resumed] == [3, 4]
    assert [drop(m) for m in straight[2:]] == [drop(m) for m in resumed]
    wa, wb = (load_model(tmp_path / r / "final").state_dict() for r in ("straight", "stopped"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _dpo_cfg(**kw):
    base = dict(response_length=64, max_prompt_length=64, temperature=1.0, sample_batch_size=4, batch_size=16,
                micro_batch_size=16, epochs=3, lr=1e-4, beta=0.1, pairs_per_problem=0, seed=0)
    base.update(kw)
    return dpo.DPOConfig(**base)


def test_dpo_pairs_are_verifier_labelled_resumable_and_training_widens_the_margin(toy, tmp_path):
    data = tmp_path / "problems.json"
    data.write_text(json.dumps(json.loads((toy / "problems.json").read_text()) * 4))  # 16 problems, 4 calls of 4
    sft = toy / "sft" / "final"
    stats, history = dpo.train(_dpo_cfg(), sft, data, tmp_path / "dpo", ExactMatchVerifier())
    pairs_file = tmp_path / "dpo" / "pairs.jsonl"
    lines = pairs_file.read_text().splitlines()
    assert len(lines) == 16 and stats["problems"] == 16 and stats["pairs"] >= 4, stats
    n_pairs = 0
    for line in lines:
        r = json.loads(line)
        assert len(r["responses"]) == 5 and len(r["scores"]) == 5
        for w, l in r["pairs"]:
            n_pairs += 1
            final_w, final_l = extract_final_response(r["responses"][w]), extract_final_response(r["responses"][l])
            assert r["scores"][w] == RewardConfig.correct and final_w is not None and exact_match(final_w, "red")
            assert r["scores"][l] != RewardConfig.correct and (final_l is None or not exact_match(final_l, "red"))
        has_both = RewardConfig.correct in r["scores"] and any(s != RewardConfig.correct for s in r["scores"])
        assert bool(r["pairs"]) == has_both  # a problem without both kinds gives no pair
        assert len(r["pairs"]) == min(sum(s == 1.0 for s in r["scores"]), sum(s != 1.0 for s in r["scores"]))
    assert n_pairs == stats["pairs"]

    # resume: drop the last sampling call (4 problems) and cut a line short as a crash would; the rerun
    # redoes exactly those problems, with the same samples
    pairs_file.write_text("\n".join(lines[:12]) + "\n" + lines[12][:40])
    dpo.build_pairs(_dpo_cfg(), load_model(sft), Tokenizer.from_dir(sft), read_problems(data), ExactMatchVerifier(),
                    pairs_file, progress=False)
    assert pairs_file.read_text().splitlines() == lines

    # training: the chosen-vs-rejected log-prob margin grows (3 steps over the pairs)
    assert len(history) == 3 and history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # π = π_ref at step 1
    tok = Tokenizer.from_dir(sft)
    items = read_problems(data)
    recs = dpo.read_pair_records(pairs_file, items, 5)
    prompts = [tok.apply_chat_template([{"role": "user", "content": items[r.problem].x}])
               for r in recs for _ in r.pairs]
    chosen = [r.response_ids[w] for r in recs for w, _ in r.pairs]
    rejected = [r.response_ids[l] for r in recs for _, l in r.pairs]
    batch = dpo.pair_batch(prompts + prompts, chosen + rejected, tok.pad_id)

    def margin(model):
        with torch.no_grad():
            lp = dpo.sequence_logprobs(model.eval(), batch)
        return (lp[:len(chosen)] - lp[len(chosen):]).mean().item()

    before, after = margin(load_model(sft)), margin(load_model(tmp_path / "dpo" / "final"))
    assert after > before + 0.5, (before, after)


def test_pairs_file_errors_name_file_line_and_field(toy, tmp_path):
    items = read_problems(toy / "problems.json")
    bad = tmp_path / "pairs.jsonl"
    good = {"problem": 0, "Open-ended Verifiable Question": items[0].x, "Ground-True Answer": "red",
            "responses": ["a", "b"], "response_ids": [[1], [2]], "scores": [1.0, 0.1], "pairs": [[0, 1]]}
    second = {**good, "problem": 1, "Open-ended Verifiable Question": items[1].x, "pairs": [[0, 7]]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(FormatError, match=r"pairs.jsonl: line 2: field 'pairs'"):
        dpo.read_pair_records(bad, items, 2)
    bad.write_text(json.dumps({**good, "Open-ended Verifiable Question": "Say purple."}) + "\n")
    with pytest.raises(FormatError, match=r"line 1: field 'problem'"):
        dpo.read_pair_records(bad, items, 2)


def test_cli_runs_each_variant_at_toy_size(toy, tmp_path, capsys):
    common = ["--policy", str(toy / "sft" / "final"), "--data", str(toy / "problems.json"), "--verifier", "exact",
              "--preset", "tiny-world", "--response-length", "48", "--max-prompt-length", "64"]
    assert cli.main(["rloo", *common, "--out", str(tmp_path / "rloo"), "--batch-size", "8", "--micro-batch-size", "8",
                     "--max-updates", "1"]) == 0
    assert cli.main(["grpo", *common, "--out", str(tmp_path / "grpo"), "--batch-size", "8", "--micro-batch-size", "8",
                     "--max-updates", "1"]) == 0
    assert cli.main(["dpo", *common, "--out", str(tmp_path / "dpo"), "--samples-per-problem", "3",
                     "--pairs-only"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("update") for x in lines[:2]] == [1, 1] and lines[2]["problems"] == 4
    for name in ("rloo", "grpo"):
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 1
        assert load_model(tmp_path / name / "final").cfg.vocab_size == 320  # an HF-layout policy checkpoint
    assert len((tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()) == 4

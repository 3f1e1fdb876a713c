"""PPO checklist items (notes/ppo.md § The PPO checklist) checked by behaviour, each test failing when
its item is broken: the official preset's rollout, steps and reward (5, 8, 11, 17, 30), the
temperature on the training forward (7), returns from the unwhitened advantages (23), vf_coef (28),
global gradient clipping (32); and the audit fixes of issue 17 around them: one vocabulary for the
critic, V_old without the policy's LM head, no prompt twice in a batch, no dead config field."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_plain_tokenizer

from minihuatuo.engine.checkpoint import CheckpointError, load_model
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.services.formats import read_problems
from minihuatuo.services.reward import RewardConfig, build_verifier
from minihuatuo.services.verifier import ExactMatchVerifier
from minihuatuo.stages.rl import ppo, ppo_run
from minihuatuo.stages.rl import rollout as rl
from minihuatuo.stages.rl.ppo import PRESETS, PPOConfig
from minihuatuo.stages.rl.rollout import (
    forward_inputs,
    response_logprobs,
    response_positions,
    response_values,
    stop_ids,
)
from minihuatuo.training.distributed import Dist

PACKAGE = Path(__file__).resolve().parents[1] / "minihuatuo"
NO_CLIP = 1e30  # max_grad_norm above any gradient norm: no clipping (config values are finite, so not inf)


def small(cfg: PPOConfig, **kw) -> PPOConfig:
    """A preset with only its sizes made small enough for the toy task (4 problems)."""
    return replace(cfg, **{"response_length": 8, "max_prompt_length": 64, "batch_size": 4, "micro_batch_size": 4,
                           "total_episodes": 8, **kw})


def experience(toy, cfg, tok=None):
    ac, ref = ppo_run.build_models(cfg, toy / "sft" / "final", None, "cpu")
    tok = tok or Tokenizer.from_dir(toy / "sft" / "final")
    exp = ppo.collect(0, cfg, ac, ref, tok, read_problems(toy / "problems.json"), ExactMatchVerifier(), Dist(),
                            RewardConfig(), {})
    return ac, ref, exp


class GradRecorder(torch.optim.SGD):
    """An optimizer that takes no step (lr 0) and records every gradient it is asked to apply."""

    def __init__(self, named_params):
        self.names = [n for n, _ in named_params]
        super().__init__([p for _, p in named_params], lr=0.0)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                           for n, p in zip(self.names, params)})


def learn_grads(ac, cfg, exp) -> dict[str, torch.Tensor]:
    opt = GradRecorder(list(ac.named_parameters()))
    ppo.learn(0, cfg, ac, opt, exp)
    assert len(opt.grads) == cfg.ppo_epochs * cfg.num_mini_batches
    return opt.grads[0]


# ----------------------------------------------------------------------------- the official preset's behaviour

def test_official_preset_generates_every_token_and_steps_three_times(toy, monkeypatch):
    """Checklist 5 (always R tokens, no early stop), 30 (one optimizer step per PPO epoch: 3 per
    update), 17 (no missing-stop penalty), 6 (sampling at T = 0.5): the `official` preset with only
    its sizes shrunk, against `tiny-world`, which stops early."""
    seen = []
    real_generate = rl.generate

    def recording_generate(model, prompts, cfg, pad_id):
        out = real_generate(model, prompts, cfg, pad_id=pad_id)
        seen.append((cfg.stop_token_ids, out.tokens.shape[1]))
        return out

    monkeypatch.setattr(rl, "generate", recording_generate)
    official = small(PRESETS["official"], response_length=48)
    ac, _, exp = experience(toy, official)
    (stops, generated), = seen
    assert stops == () and generated == 48  # no early stop: every row ran to R (checklist 5)
    assert exp.ro.has_stop.all()  # ... although every toy reply ends well before R
    with torch.no_grad():  # the sampler's log-probs are log_softmax(z / 0.5) (checklist 6)
        at_t = response_logprobs(ac.policy, exp.ro, 0.5) * exp.ro.policy_mask
        at_1 = response_logprobs(ac.policy, exp.ro, 1.0) * exp.ro.policy_mask
    torch.testing.assert_close(at_t, exp.ro.logprobs, atol=1e-4, rtol=0)
    assert (at_1 - exp.ro.logprobs).abs().max() > 1e-2

    seen.clear()
    experience(toy, small(PRESETS["tiny-world"], response_length=48))
    assert seen[0][0] != () and seen[0][1] < 48  # tiny-world stops at the stop token

    opt = GradRecorder(list(ac.named_parameters()))
    ppo.learn(0, official, ac, opt, exp)
    assert len(opt.grads) == 3  # 3 PPO epochs × 1 minibatch (checklist 30)

    cut = small(PRESETS["official"])  # R = 8: no toy reply ends in 8 tokens
    _, _, exp = experience(toy, replace(cut, missing_stop_penalty=0.0))
    assert not exp.ro.has_stop.any() and torch.equal(exp.scores, exp.raw_scores)  # checklist 17
    _, _, pen = experience(toy, replace(cut, missing_stop_penalty=0.5))
    torch.testing.assert_close(pen.scores, pen.raw_scores - 0.5)  # the option, when set, subtracts


def test_official_stop_set_is_the_tokenizers_eos_token(toy, tmp_path, monkeypatch):
    """Checklist 8: the official run ends a response only at tokenizer.eos_token_id, not at every
    generation_config eos id (Llama-3.1-Instruct lists three). A tokenizer directory shaped like that,
    read by Tokenizer.from_dir; then the ids `collect` hands to the rollout under each setting."""
    d = tmp_path / "tok"
    shutil.copytree(toy / "sft" / "final", d)
    tok_file = json.loads((d / "tokenizer.json").read_text())
    end, pad = (next(t["id"] for t in tok_file["added_tokens"] if t["content"] == s) for s in ("<|end|>", "<|pad|>"))
    other = next(t["id"] for t in tok_file["added_tokens"] if t["content"] == "<|system|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [other, end], "pad_token_id": pad}))
    tok = Tokenizer.from_dir(d)
    assert tok.eos_ids == [other, end] and tok.eos_token_id == end
    assert stop_ids(tok, "eos_token") == [end] and stop_ids(tok, "all") == [other, end]

    passed = []
    real_rollout = rl.rollout
    monkeypatch.setattr(rl, "rollout", lambda *a, **k: passed.append(a[5]) or real_rollout(*a, **k))
    for which in ("eos_token", "all"):
        experience(toy, small(PRESETS["official"], stop_tokens=which), tok=tok)
    assert passed == [[end], [other, end]]
    with pytest.raises(ValueError, match="stop_tokens"):
        stop_ids(tok, "eot")


# ----------------------------------------------------------------------------- checklist 7, 23, 28, 32

def test_training_forward_divides_the_logits_by_the_temperature(toy):
    """Checklist 7: the training forward (ActorCritic, both LM-head paths) gives log_softmax(z / T)[a]
    computed here from the model's plain logits; and in `learn` at lr 0 the first epoch's ratio is 1
    only because that forward uses the sampler's T (a T-less forward would show a large approx_kl)."""
    cfg = small(PRESETS["tiny-world"], response_length=32, temperature=0.6, value_head="separate", ppo_epochs=1)
    ac, _, exp = experience(toy, cfg)
    ro = exp.ro
    ids, mask, pos = forward_inputs(ro)
    at = response_positions(ro)
    with torch.no_grad():
        logits = ac.policy(ids, attention_mask=mask, position_ids=pos)  # (B, P + R, V)
        by_hand = torch.log_softmax(logits[at].double() / 0.6, -1).gather(-1, ro.response.reshape(-1, 1))
        for fused in (False, True):
            logp, _, _ = ac(ids, mask, pos, at, ro.response.reshape(-1), 0.6, fused)
            torch.testing.assert_close(logp.double(), by_hand.squeeze(-1), atol=1e-5, rtol=0)
    opt = GradRecorder(list(ac.named_parameters()))
    logs = ppo.learn(0, cfg, ac, opt, exp)
    assert max(logs["approx_kl"]) < 1e-9 and abs(logs["ratio"][0] - 1) < 1e-5
    hot = replace(cfg, temperature=1.0)  # the same experience read at another temperature
    logs = ppo.learn(0, hot, ac, GradRecorder(list(ac.named_parameters())), exp)
    assert max(logs["approx_kl"]) > 1e-5  # measured 6e-4: the toy policy is sharp, T moves it little


def test_returns_are_unwhitened_advantages_plus_values(toy):
    """Checklist 23 (and 18, 19, 21, 24 on the way): returns and advantages of `collect`, recomputed
    here by plain loops from the experience's raw parts: r_t = −β k1_t (+ s at L + 1), GAE(γ, λ) backwards,
    R = A + V_old with the RAW A; the advantages are that A whitened over t ≤ L (unbiased)."""
    cfg = small(PRESETS["tiny-world"], response_length=32, temperature=1.5, lam=0.9, beta=0.05,
                value_head="separate")
    ac, _, exp = experience(toy, cfg)
    ro, V = exp.ro, exp.old_values.double()
    B, R = ro.response.shape
    kl = ((ro.logprobs - exp.ref_logprobs) * ro.policy_mask).double()
    A = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        L = int(ro.last[b])
        r = [-cfg.beta * kl[b, t].item() for t in range(R)]
        r[L + 1 if L + 1 < R else L] += exp.scores[b].item()
        running = 0.0
        for t in reversed(range(R)):
            v_next = V[b, t + 1].item() if t + 1 < R else 0.0
            running = r[t] + cfg.gamma * v_next - V[b, t].item() + cfg.gamma * cfg.lam * running
            A[b, t] = running
    torch.testing.assert_close(exp.returns.double(), A + V, atol=1e-5, rtol=1e-5)
    valid = A[ro.policy_mask]
    whitened = (A - valid.mean()) / (valid.var(unbiased=True) + 1e-8).sqrt() * ro.policy_mask
    torch.testing.assert_close(exp.advantages.double(), whitened, atol=1e-5, rtol=1e-5)
    assert valid.std() > 0.05 and abs(valid.std() - 1) > 0.05  # raw A is not already whitened: the test can tell


def test_vf_coef_scales_the_critics_gradient_only(toy):
    """Checklist 28: total loss L_π + c_V L_V. With a separate critic, the critic's gradient is linear
    in c_V (0 at c_V = 0) and the policy's does not depend on it."""
    cfg = small(PRESETS["tiny-world"], response_length=32, temperature=1.5, value_head="separate", ppo_epochs=1,
                max_grad_norm=NO_CLIP)
    ac, _, exp = experience(toy, cfg)
    g = {c: learn_grads(ac, replace(cfg, vf_coef=c), exp) for c in (0.0, 0.1, 0.4)}
    critic = [n for n in g[0.1] if ".critic." in f".{n}"]
    policy = [n for n in g[0.1] if n.startswith("policy.")]
    assert critic and policy
    assert all(torch.count_nonzero(g[0.0][n]) == 0 for n in critic)
    assert sum(g[0.1][n].abs().sum() for n in critic) > 0
    for n in critic:
        torch.testing.assert_close(g[0.4][n], 4 * g[0.1][n], atol=1e-7, rtol=1e-4)
    for n in policy:
        torch.testing.assert_close(g[0.4][n], g[0.1][n], atol=1e-7, rtol=1e-5)


def test_gradients_are_clipped_to_max_grad_norm_over_policy_and_critic_together(toy):
    """Checklist 32: one global norm over the union of policy and critic parameters; every gradient,
    the policy's and the critic's, is scaled by the same factor max_grad_norm / ‖g‖."""
    # vf_coef 8: the critic's gradient then has about the policy's norm (at 0.5 it is ~5% of it)
    cfg = small(PRESETS["tiny-world"], response_length=32, temperature=1.5, value_head="separate", ppo_epochs=1,
                vf_coef=8.0)
    ac, _, exp = experience(toy, cfg)
    free = learn_grads(ac, replace(cfg, max_grad_norm=NO_CLIP), exp)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in free.values())).item()
    policy_norm = torch.sqrt(sum((g.double() ** 2).sum() for n, g in free.items() if n.startswith("policy."))).item()
    assert 0.05 * norm < policy_norm < 0.95 * norm  # both parts matter, so per-part clipping would differ
    clipped = learn_grads(ac, replace(cfg, max_grad_norm=norm / 4), exp)
    for n, g in free.items():
        torch.testing.assert_close(clipped[n], g / 4, atol=1e-8, rtol=1e-4)


# ----------------------------------------------------------------------------- audit fixes (issue 17)

def test_values_for_v_old_do_not_run_the_policys_lm_head(toy, monkeypatch):
    """collect's V_old needs the critic only: the policy's LM head and log-softmax over the vocabulary
    are not run (they cost a (N, V) matrix per forward), and the values are the critic's."""
    cfg = small(PRESETS["tiny-world"], response_length=32, value_head="separate")
    ac, _, exp = experience(toy, cfg)

    def no_head(*a, **k):
        raise AssertionError("the policy's LM head ran")

    monkeypatch.setattr(ac.policy.lm_head, "forward", no_head)
    v = ppo.critic_values(ac, exp.ro)
    with torch.no_grad():
        torch.testing.assert_close(v, response_values(ac.critic, exp.ro), atol=1e-6, rtol=0)


def test_a_critic_with_another_vocabulary_is_refused(toy, tmp_path):
    """Checklist 2: the critic reads the policy's token ids. A --value-model with another tokenizer
    (same embedding size, so the forward would run) or too small an embedding table is an error."""
    policy = toy / "sft" / "final"
    cfg = small(PRESETS["tiny-world"], value_head="separate")
    same = tmp_path / "same"
    shutil.copytree(policy, same)
    ac, _ = ppo_run.build_models(cfg, policy, same, "cpu")  # the same vocabulary: accepted
    assert ac.critic is not None
    other = tmp_path / "other"
    shutil.copytree(policy, other)
    write_plain_tokenizer(other, vocab_size=280)  # another BPE vocabulary, the same 320-row embedding
    with pytest.raises(CheckpointError, match=r"other.*another vocabulary"):
        ppo_run.build_models(cfg, policy, other, "cpu")
    narrow = tmp_path / "narrow"
    shutil.copytree(policy, narrow)
    conf = json.loads((narrow / "config.json").read_text())
    model = load_model(policy)
    from minihuatuo.engine.checkpoint import save_model
    from minihuatuo.engine.model import build_model
    small_model = build_model(replace(model.cfg, vocab_size=200), seed=0)
    save_model(small_model, narrow, copy_files_from=policy)
    assert json.loads((narrow / "config.json").read_text())["vocab_size"] == 200 != conf["vocab_size"]
    with pytest.raises(CheckpointError, match=r"narrow.*200 rows"):
        ppo_run.build_models(cfg, policy, narrow, "cpu")


def test_no_prompt_twice_in_a_batch_with_drop_last():
    """The official loader drops each data epoch's last partial batch, so a batch never holds a prompt
    twice; ⌊n / batch⌋ batches per epoch cover distinct items, and a resumed run gets the same ones."""
    n, bs = 10, 4
    batches = [rl.update_prompts(n, u, bs, seed=7) for u in range(12)]
    assert all(len(b) == bs and len(set(b)) == bs for b in batches)
    for e in range(6):  # 2 batches per epoch; 2 items of each epoch wait for the next permutation
        assert len(set(batches[2 * e]) | set(batches[2 * e + 1])) == 8
    assert batches[5] == rl.update_prompts(n, 5, bs, seed=7)
    assert batches[0] != batches[2]  # a new permutation every epoch
    with pytest.raises(ValueError, match="cannot fill one batch"):
        rl.update_prompts(3, 0, 4, seed=7)
    stream = [rl.update_prompts(n, u, bs, seed=7, drop_last=False) for u in range(3)]
    assert sorted(stream[0] + stream[1] + stream[2][:2]) == list(range(n))  # the stream: every item once per epoch


def tracked(cfg):
    """A copy of the config dataclass `cfg` that records which fields the package's code reads (reads
    made by the dataclasses module itself — asdict, replace — do not count)."""
    import sys

    reads: set[str] = set()
    base = type(cfg)

    class Tracked(base):
        def __getattribute__(self, name):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("minihuatuo"):
                reads.add(name)
            return base.__getattribute__(self, name)

    return Tracked(**dataclasses.asdict(cfg)), reads


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "dpo"])
def test_every_config_field_is_read_by_the_code(algo, toy, tmp_path):
    """A field that becomes a CLI flag but that no code reads is a silent no-op for the user (as
    PPOConfig.distributed was). One short run of each RL command's `train` must read every field of its
    config (the run does not need to act on each: a read is where the value decides something)."""
    from minihuatuo.stages.rl import dpo, grpo, rloo

    policy, data = toy / "sft" / "final", toy / "problems.json"
    common = dict(response_length=48, max_prompt_length=64, micro_batch_size=8, lr=1e-5, save_every=1)
    if algo == "ppo":
        cfg, reads = tracked(PPOConfig(**common, batch_size=4, total_episodes=8, value_head="separate"))
        ppo_run.train(cfg, policy, data, tmp_path, ExactMatchVerifier(), max_updates=2)
    elif algo in ("rloo", "grpo"):
        module = rloo if algo == "rloo" else grpo
        conf = rloo.RLOOConfig if algo == "rloo" else grpo.GRPOConfig
        extra = {"rloo_k": 2} if algo == "rloo" else {"group_size": 2}
        cfg, reads = tracked(conf(**common, **extra, batch_size=8, total_episodes=16))
        module.train(cfg, policy, data, tmp_path, ExactMatchVerifier(), max_updates=2)
    else:
        cfg, reads = tracked(dpo.DPOConfig(**common, samples_per_problem=5, batch_size=2, epochs=1))
        dpo.train(cfg, policy, data, tmp_path, ExactMatchVerifier(), max_steps=2)
    unread = [f.name for f in dataclasses.fields(cfg) if f.name not in reads]
    assert not unread, f"{type(cfg).__mro__[1].__name__} fields no code read: {unread}"


def test_rl_commands_pass_the_classifier_template(toy, tmp_path, capsys):
    """ppo / rloo / grpo / dpo take --classifier-template and the classifier verifier they build reads
    it; without one, a loud warning says the built-in template is not the checkpoint's."""
    from minihuatuo.cli import build_parser
    from minihuatuo.services.verifier import PLACEHOLDERS

    assert "{response}" in PLACEHOLDERS
    clf = tmp_path / "clf"
    model = load_model(toy / "sft" / "final")
    from minihuatuo.engine.checkpoint import save_model
    model.cfg = replace(model.cfg, lm_head=False, num_labels=2, tie_word_embeddings=False)
    model.lm_head = None
    model.score = torch.nn.Linear(model.cfg.hidden_size, 2, bias=False)
    save_model(model, clf, copy_files_from=toy / "sft" / "final")
    template = tmp_path / "t.txt"
    template.write_text("R: {response} | G: {reference}{eos}")
    for command in ("ppo", "rloo", "grpo", "dpo"):
        args = build_parser().parse_args([command, "--policy", "P", "--data", "D", "--out", "O", "--verifier",
                                          "classifier", "--verifier-model", str(clf), "--classifier-template",
                                          str(template)])
        v = build_verifier(args.verifier, args)
        assert v.template == "R: {response} | G: {reference}{eos}", command
    assert "WARNING" not in capsys.readouterr().err
    args = build_parser().parse_args(["ppo", "--policy", "P", "--data", "D", "--out", "O", "--verifier", "classifier",
                                      "--verifier-model", str(clf)])
    build_verifier(args.verifier, args)
    assert "WARNING: --verifier classifier runs with minihuatuo's built-in input template" in capsys.readouterr().err



def test_losses_are_finite_whatever_the_padding_holds():
    """Padding may hold any log-probs (checklist 10: the official code writes a placeholder there). A
    log-ratio of +100 in a padding slot overflows exp in fp32; masked before exp, the PPO and GRPO losses
    and their gradients equal those with zeros in the padding, and RLOO's ignores −inf there."""
    from minihuatuo.stages.rl import grpo, rloo
    from minihuatuo.stages.rl.ppo import policy_loss

    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([[-1.0, -1.0, -1.0]])
    out = []
    for old_pad, new_pad in ((-100.0, 0.0), (0.0, 0.0), (0.0, float("-inf"))):
        new = torch.tensor([[0.3, -0.4, new_pad]], requires_grad=True)
        old = torch.tensor([[0.0, 0.0, old_pad]])
        losses = [policy_loss(new, old, adv, mask, 0.2)[0],
                  grpo.grpo_loss(new, old, torch.zeros(1, 3), adv[:, 0], mask, 0.2, 0.1)[0],
                  rloo.sequence_policy_loss(new, old, adv[:, 0], mask, 0.2)[0]]
        sum(losses).sum().backward()
        assert all(torch.isfinite(x).all() for x in losses) and torch.isfinite(new.grad).all(), (old_pad, new_pad)
        out.append((torch.stack([x.detach().sum() for x in losses]), new.grad[:, :2].clone()))
    for a, b in out[1:]:
        torch.testing.assert_close(a, out[0][0])
        torch.testing.assert_close(b, out[0][1])

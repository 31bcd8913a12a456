"""The attack suite on a tiny random Llama: every attack recovers tokens from a deliberately weak obfuscation
(noise off, no block permutation), recovers fewer from a strong one, and is scored the same way."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.attacks import tfma
from aloe.attacks.common import Budget, Target
from aloe.attacks.scoring import IdGuess, SeqGuess, score_ids, score_sequences
from aloe.attacks.suite import run, synthetic_texts
from aloe.attacks.theorem6 import binary_kl, max_success, theorem6
from aloe.cli import main
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.obfuscation.secret import load_secret
from obfuscation_helpers import tiny_model

WEAK = PROFILES["exact"].with_overrides(name="weak", h=8)
STRONG = PROFILES["paper"].with_overrides(name="strong", h=8, alpha_e=3.0, alpha_h=3.0, beta=4, gamma=10.0)
NOISY = PROFILES["exact"].with_overrides(name="noisy", h=8, alpha_e=3.0, alpha_h=3.0)
BUDGET = dict(columns=64, quantiles=16, topk=5, sequences=3, seq_len=10, isa_steps=30, ima_tokens=2048,
              ima_steps=150, tfma_tokens=4000, behaviour_rows=97, learned_steps=60, seed=1)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the attacker's cached assets (own artifact, plain behaviour) out of the user's cache."""
    old = os.environ.get("ALOE_CACHE")
    os.environ["ALOE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ALOE_CACHE")
    else:
        os.environ["ALOE_CACHE"] = old


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return tiny_model("llama-gqa-tied", tmp_path_factory.mktemp("plain") / "plain")


def deploy(plain_dir, tmp_path_factory, profile):
    d = tmp_path_factory.mktemp(profile.name)
    calib = np.arange(3, 97).repeat(3) if profile.keys == "paper" else None
    obfuscate_checkpoint(plain_dir, d / "obf", d / "secret.json", profile, progress=False, calibration_ids=calib)
    return d / "obf", load_secret(d / "secret.json").tau


@pytest.fixture(scope="module")
def weak(plain_dir, tmp_path_factory):
    return deploy(plain_dir, tmp_path_factory, WEAK)


@pytest.fixture(scope="module")
def strong(plain_dir, tmp_path_factory):
    return deploy(plain_dir, tmp_path_factory, STRONG)


@pytest.fixture(scope="module")
def noisy(plain_dir, tmp_path_factory):
    return deploy(plain_dir, tmp_path_factory, NOISY)


def attack(plain_dir, deployment, names, **budget):
    obf, tau = deployment
    t = Target(plain_dir, obf, Budget(**{**BUDGET, **budget}))
    return run(t, names, tau, synthetic_texts(97, t.fixed_ids, t.budget), progress=False)


@pytest.mark.parametrize("name", ["vma", "ia", "nn", "behavioural", "anchored"])
def test_weight_and_behaviour_attacks_break_a_weak_obfuscation_on_the_full_vocabulary(plain_dir, weak, name):
    r = attack(plain_dir, weak, [name])[name]
    assert r["candidates"] == 97 and r["queries"] == 95            # every movable id, against the whole vocabulary
    assert r["token_recovery"] >= 0.9 and r["prompt_token_recovery"] >= 0.9


def test_anchor_contexts_are_distinct_sequences_of_fixed_ids_shortest_first():
    from aloe.attacks.anchored import anchor_contexts

    rng = np.random.default_rng(0)
    ctx = anchor_contexts(np.array([0, 1, 2]), 20, rng)
    assert len(ctx) == 20 and len(set(ctx)) == 20
    assert [len(c) for c in ctx] == sorted(len(c) for c in ctx)
    assert ctx[:3] == [(0,), (1,), (2,)] and len(ctx[3:12]) == 9 and all(len(c) == 2 for c in ctx[3:12])
    assert all(len(c) == 3 and set(c) <= {0, 1, 2} for c in ctx[12:])
    assert anchor_contexts(np.array([], dtype=np.int64), 5, rng) == []


def test_anchored_matching_reads_the_vocabulary_from_special_ids_alone(plain_dir, weak):
    """Before any bootstrap round, contexts made only of the two fixed ids already pin down most output ids: the
    logits the server reads there are the plain model's, permuted."""
    r = attack(plain_dir, weak, ["anchored"], anchored_rounds=0)["anchored"]
    assert r["rounds"] == 0 and r["anchors"] == 2 and r["contexts"] == 1024
    assert r["token_recovery"] >= 0.9 and r["anchors_only_token_recovery"] == r["token_recovery"]
    boot = attack(plain_dir, weak, ["anchored"], anchored_rounds=1, anchored_contexts=4)["anchored"]
    assert boot["contexts"] > 4 and boot["rounds"] == 1 and boot["token_recovery"] >= 0.9


def test_strong_noise_and_paper_keys_cut_the_weight_attacks(plain_dir, weak, strong):
    weak_r = attack(plain_dir, weak, ["vma", "nn", "ia"])
    strong_r = attack(plain_dir, strong, ["vma", "nn", "ia"])
    for name in ("vma", "nn", "ia"):
        assert strong_r[name]["token_recovery"] < weak_r[name]["token_recovery"] - 0.3


def test_isa_and_both_ima_variants_recover_tokens_from_a_weak_obfuscation(plain_dir, weak):
    r = attack(plain_dir, weak, ["isa", "ima"])
    chance = 1 / 95
    assert r["isa"]["token_recovery"] >= 0.8 and r["isa"]["prompt_token_recovery"] >= 0.8
    assert r["ima"]["known_plaintext"]["token_recovery"] >= 0.8
    assert r["ima"]["prompt_token_recovery"] > 5 * chance         # own keys: key-invariant features transfer
    assert r["ima"]["queries"] == 30 and r["isa"]["prompt_tokens"] == 40


def test_learned_matching_trained_on_own_copies_breaks_a_weak_obfuscation(plain_dir, weak):
    r = attack(plain_dir, weak, ["learned"])["learned"]
    assert r["candidates"] == 97 and r["queries"] == 95
    assert r["token_recovery"] >= 0.9 and r["prompt_token_recovery"] >= 0.9
    assert r["whitened_token_recovery"] >= 0.9                 # the non-neural baseline, scored as a secondary guess
    assert r["own_copies"] == 2 and r["own_copy_adapted"] is False and r["state_rows"] == 95
    # the states block on a uniform sample of ids only, and no states block at all
    part = attack(plain_dir, weak, ["learned"], learned_state_ids=20)["learned"]
    assert part["state_rows"] == 20 and part["token_recovery"] >= 0.9
    off = attack(plain_dir, weak, ["learned"], learned_state_ids=-1, learned_draws=1)["learned"]
    assert off["state_rows"] == 0 and off["own_copies"] == 1 and off["token_recovery"] >= 0.9


def test_decoding_the_traffic_reorders_the_learned_candidates_of_every_id_it_sees(plain_dir, weak):
    r = attack(plain_dir, weak, ["learned", "decoded"])
    d = r["decoded"]
    assert d["queries"] == r["learned"]["queries"] == 95
    # the victim's prompts and the first 2,000 ids of its stream (all ranked at this budget), decoded with the public
    # model
    assert 2000 <= d["decoded_occurrences"] < 2100 and d["decoded_clusters"] >= 50 and 1 <= d["sweeps"] <= 8
    assert d["per_id_token_recovery"] == r["learned"]["token_recovery"]
    assert d["per_id_prompt_token_recovery"] == r["learned"]["prompt_token_recovery"]
    # decoding reorders each id's candidates and adds none (the synthetic ids carry no language, so the random
    # model's order is no better than the matcher's: the gain is measured on SmolLM2 in benchmarks/privacy_full.py)
    for key in ("token_recovery_top5", "prompt_token_recovery_top5"):
        assert d[key] == r["learned"][key]
    assert 0 < d["token_recovery"] <= d["token_recovery_top5"]


def test_heavy_noise_cuts_the_learned_matching(plain_dir, weak, noisy):
    weak_r = attack(plain_dir, weak, ["learned"])["learned"]
    noisy_r = attack(plain_dir, noisy, ["learned"])["learned"]
    assert noisy_r["token_recovery"] <= weak_r["token_recovery"] - 0.5
    assert noisy_r["whitened_token_recovery"] <= weak_r["whitened_token_recovery"] - 0.5


def test_learning_what_the_noise_does_beats_the_hand_made_signatures(plain_dir, tmp_path_factory):
    medium = deploy(plain_dir, tmp_path_factory, PROFILES["exact"].with_overrides(name="medium", h=8, alpha_e=0.6,
                                                                                  alpha_h=0.6))
    r = attack(plain_dir, medium, ["learned", "vma"])
    assert r["learned"]["token_recovery"] >= r["vma"]["token_recovery"] + 0.25


def test_cli_runs_the_learned_attack_alone(plain_dir, weak, capsys):
    obf, _ = weak
    argv = ["attack", "learned", "--model", str(plain_dir), "--obfuscated", str(obf), "--secret",
            str(obf.parent / "secret.json"), "--columns", "32", "--learned-steps", "10", "--learned-state-ids", "30",
            "--attacker-seed", "0", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"learned"}
    r = out["learned"]
    for key in ("token_recovery", "prompt_token_recovery", "whitened_token_recovery"):
        assert 0.0 <= r[key] <= 1.0
    assert r["token_recovery"] >= 0.5 and r["state_rows"] == 30
    with pytest.raises(SystemExit) as exc:       # refused by the parser, before anything is loaded
        main(argv[:-1] + ["--learned-draws", "0", "--json"])
    assert exc.value.code == 2 and "--learned-draws: 0 is not positive" in capsys.readouterr().err


def test_own_copies_are_cached_per_draw_and_skip_the_adaptation(plain_dir, weak, tmp_path):
    from aloe.attacks.ima import own_obfuscation, own_profile

    obf, _ = weak
    t = Target(plain_dir, obf, Budget(**BUDGET))
    d0, tau0 = own_obfuscation(t)
    again, tau_again = own_obfuscation(t, draw=0)                 # cached: the same copy (IMA's) every time
    assert again == d0 and np.array_equal(tau_again, tau0)
    d1, tau1 = own_obfuscation(t, draw=1)
    assert d1 != d0 and not np.array_equal(tau0, tau1)
    manifest = json.loads((obf / "aloe.json").read_text())
    manifest["profile"]["adapt_steps"] = 50
    t.manifest = manifest
    assert own_profile(t).adapt_steps == 50 and own_profile(t, adapt=False).adapt_steps == 0
    assert own_profile(t).qk_scale == tuple(manifest["profile"]["qk_scale"])
    manifest["profile"]["not_a_field"] = 1
    with pytest.raises(AloeError, match="does not fit"):
        own_profile(t)
    with pytest.raises(AloeError):
        own_obfuscation(t, draw=-1)


def test_column_signature_in_chunks_equals_the_whole_table_at_once():
    from aloe.attacks.behavioural import OUT_Q, column_signature

    full = torch.randn(301, 1000).half()
    x = full.float()
    whole = torch.cat([x.mean(0, keepdim=True), x.std(0, keepdim=True),
                       x.sort(0).values[torch.linspace(0, 300, OUT_Q).round().long()]], 0).T
    chunked = column_signature(full, chunk=333)
    assert chunked.shape == (1000, OUT_Q + 2)
    assert torch.equal(chunked[:, 2:], whole[:, 2:])
    torch.testing.assert_close(chunked, whole)


def test_tfma_recovers_the_frequent_tokens_of_a_stream():
    rng = np.random.default_rng(0)
    n, fixed = 50, np.array([0])
    p = 1 / np.arange(1, n) ** 1.5
    p /= p.sum()
    tau = np.concatenate([[0], 1 + rng.permutation(n - 1)])
    stream, prior = 1 + rng.choice(n - 1, 20000, p=p), 1 + rng.choice(n - 1, 20000, p=p)
    r = score_ids(tfma.attack(tau[stream], prior, n, fixed, k=3), tau, [stream[:100]], fixed)
    assert r["prompt_token_recovery"] > 0.5                      # the head of a Zipf stream is recovered
    assert r["token_recovery"] < r["prompt_token_recovery"]      # the tail is not
    assert r["token_recovery_top3"] >= r["token_recovery"]


def test_sda_in_the_suite_reads_the_head_of_the_victims_stream_from_ciphertext_alone(plain_dir, weak):
    r = attack(plain_dir, weak, ["tfma", "sda", "sda-decoded"], sda_steps=60, sda_ranks=32, decode_stream=500,
               decode_sweeps=1)
    sda, tfma_, dec = r["sda"], r["tfma"], r["sda-decoded"]
    assert sda["prior"] == "same distribution" and sda["classes"] > 10 and sda["steps"] == 60
    assert sda["candidates"] == 97 and sda["queries"] == 95
    # iid Zipf ids: no context to use, the ranks alone carry the head of the stream
    assert sda["prompt_token_recovery"] > 0.3 and sda["prompt_token_recovery"] >= tfma_["prompt_token_recovery"] - 0.1
    # the decoder reuses the SDA guess of the same run, reorders its candidates and adds none
    assert dec["per_id_token_recovery"] == sda["token_recovery"]
    assert dec["per_id_prompt_token_recovery"] == sda["prompt_token_recovery"]
    assert 500 <= dec["decoded_occurrences"] < 600
    assert dec["sweeps"] == 1 and len(dec["moved_per_sweep"]) == 1    # the budget's sweeps bound the search
    assert dec["monotone"] is False and len(dec["objective_per_sweep"]) == 1
    # measured with the secret after the attack: the objective and the share read right of four readings
    rd = dec["readings"]
    assert rd["occurrences"] == dec["decoded_occurrences"] and "rank_prior" not in dec
    assert rd["victim"]["occurrences_right"] == 1.0
    assert rd["victim_within_candidates"]["occurrences_right"] >= max(rd["decoded"]["occurrences_right"],
                                                                      rd["first_choice"]["occurrences_right"])
    assert rd["victim_within_candidates"]["occurrences_right"] > rd["decoded"]["occurrences_right"]
    for name in ("first_choice", "decoded", "victim_within_candidates"):
        r_ = rd[name]
        assert r_["text_logprob"] < 0 and r_["rank_prior_logprob"] < 0
        assert r_["objective"] == pytest.approx(r_["text_logprob"] + r_["rank_prior_logprob"])
    with pytest.raises(AloeError, match="at least one sweep"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_sweeps=0)
    em = attack(plain_dir, weak, ["sda-decoded"], sda_steps=60, sda_ranks=32, decode_stream=500, decode_em=3)
    em = em["sda-decoded"]
    assert em["search"] == "em" and 1 <= em["iterations"] <= 3 and len(em["loglik_per_iteration"]) == em["iterations"]
    assert em["transition_pairs"] > 0 and 500 <= em["decoded_occurrences"] < 600
    # EM has no rank prior: only the text's log-probability of each reading
    assert em["readings"]["decoded"]["objective"] is None and em["readings"]["decoded"]["text_logprob"] < 0
    with pytest.raises(AloeError, match="choose one decoder search"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_em=2,
               decode_monotone=True)
    with pytest.raises(AloeError, match="choose one decoder search"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_monotone=True,
               decode_sequential=True)
    seq = attack(plain_dir, weak, ["sda-decoded"], sda_steps=60, sda_ranks=32, decode_stream=500, decode_sweeps=2,
                 decode_sequential=True)["sda-decoded"]
    assert seq["search"] == "sequential" and seq["temperature_per_sweep"] == [1.0, 0.0]
    assert len(seq["objective_per_sweep"]) == 2 and seq["readings"]["decoded"]["objective"] is not None
    beam = attack(plain_dir, weak, ["sda-decoded"], sda_steps=60, sda_ranks=32, decode_stream=500, decode_sweeps=1,
                  decode_beam=2)["sda-decoded"]
    assert beam["search"] == "beam" and beam["beam_width"] == 2 and beam["passes"] == 1
    assert len(beam["objective_per_pass"]) == len(beam["moved_per_pass"]) == len(beam["beam_spread_per_pass"]) == 1
    # what the beam returns is the reading whose objective it recorded, scored again with the secret
    assert beam["readings"]["decoded"]["objective"] == pytest.approx(beam["objective_per_pass"][0], rel=1e-6)
    with pytest.raises(AloeError, match="choose one decoder search"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_beam=2,
               decode_sequential=True)
    with pytest.raises(AloeError, match="beam's width must be >= 0"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_beam=-1)
    # the one-to-one search from the sweeps' reading: what it returns is the best reading it scored
    swp = attack(plain_dir, weak, ["sda-decoded"], sda_steps=60, sda_ranks=32, decode_stream=500, decode_sweeps=1,
                 decode_swaps=2, decode_from_victim=2, decode_completion=2)["sda-decoded"]
    assert swp["search"] == "sweeps+swaps" and swp["swap_sweeps"] == len(swp["swap_objective_per_sweep"]) <= 2
    assert swp["swap_best_objective"] >= max([swp["swap_start_objective"], *swp["swap_objective_per_sweep"]])
    assert swp["readings"]["decoded"]["objective"] == pytest.approx(swp["swap_best_objective"], rel=1e-6)
    assert 0 <= swp["swap_shared"] <= swp["swap_shared_at_start"]   # the search never gives a token to a second id
    # with the secret, after the attack: the same search from the victim's reachable reading, under the same prior
    fv, within = swp["readings"]["from_victim"], swp["readings"]["victim_within_candidates"]
    assert fv["sweeps"] == len(fv["objective_per_sweep"]) == len(fv["occurrences_right_per_sweep"]) <= 2
    assert fv["rank_prior"][:3] == pytest.approx(swp["rank_prior_top3"])
    assert fv["occurrences_right_start"] <= within["occurrences_right"] + 1e-12   # made one-to-one: none gained
    assert fv["occurrences_right_start"] > swp["readings"]["decoded"]["occurrences_right"]
    assert fv["best_objective"] >= max([fv["start_objective"], *fv["objective_per_sweep"]])
    assert fv["occurrences_right"] in [fv["occurrences_right_start"], *fv["occurrences_right_per_sweep"]]
    # the best one-to-one completion: every id whose victim token is among its candidates holds it throughout
    vc = swp["readings"]["victim_completion"]
    assert vc["sweeps"] == len(vc["objective_per_sweep"]) == len(vc["occurrences_right_per_sweep"]) <= 2
    assert vc["rank_prior"] == pytest.approx(fv["rank_prior"])
    assert all(r == pytest.approx(within["occurrences_right"]) for r in (
        vc["occurrences_right_start"], *vc["occurrences_right_per_sweep"], vc["occurrences_right"]))
    assert 0 <= vc["shared"] <= vc["shared_at_start"]
    assert vc["best_objective"] >= max([vc["start_objective"], *vc["objective_per_sweep"]])
    assert "from_victim" not in dec["readings"] and "victim_completion" not in dec["readings"]   # off unless asked
    with pytest.raises(AloeError, match="completing the victim's reading must be >= 0"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_completion=-1)
    with pytest.raises(AloeError, match="from the victim's reading must be >= 0"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_from_victim=-1)
    with pytest.raises(AloeError, match="sweeps must be >= 0"):
        attack(plain_dir, weak, ["sda-decoded"], sda_steps=5, sda_ranks=32, decode_stream=500, decode_swaps=-1)
    for key in ("token_recovery_top5", "prompt_token_recovery_top5"):
        assert dec[key] == sda[key]


def test_sda_trained_on_text_of_another_kind_reads_less(plain_dir, weak):
    obf, tau = weak
    t = Target(plain_dir, obf, Budget(**{**BUDGET, "sda_steps": 60, "sda_ranks": 32}))
    texts = synthetic_texts(97, t.fixed_ids, t.budget)
    other = synthetic_texts(97, t.fixed_ids, t.budget, seed=1)      # another popularity order: another kind of text
    r = run(t, ["sda"], tau, replace(texts, prior_cross=other.prior), progress=False)["sda"]
    assert r["prompt_token_recovery"] > 0.3
    assert r["cross_prior"]["prompt_token_recovery"] < r["prompt_token_recovery"] - 0.2


def test_scoring_counts_exactly_and_ignores_fixed_ids():
    tau = np.array([0, 3, 1, 2])                                 # id 0 fixed
    guess = IdGuess(np.array([1, 2, 3]), np.array([[2, 0], [0, 3], [1, 2]]),
                    {"other_pred": np.array([2, -1, 0])})
    r = score_ids(guess, tau, [np.array([0, 1, 2, 2, 3])], np.array([0]))
    # truth: obf 1 <- plain 2, obf 2 <- plain 3, obf 3 <- plain 1
    assert r["token_recovery"] == pytest.approx(2 / 3) and r["token_recovery_top2"] == pytest.approx(1.0)
    assert r["prompt_token_recovery"] == pytest.approx(3 / 4) and r["prompt_tokens"] == 4
    assert r["other_token_recovery"] == pytest.approx(0.5)
    seq = SeqGuess([np.array([[1, 2], [3, 0]])], [np.array([[0, 1], [2, 3]])])
    s = score_sequences(seq, [np.array([1, 0])], [np.array([0, 3])], np.array([0]))
    assert s["token_recovery"] == 1.0 and s["prompt_token_recovery"] == 0.0 and s["prompt_token_recovery_top2"] == 1.0


def test_theorem6_bound_falls_with_noise_and_is_infinite_without():
    g = torch.Generator().manual_seed(0)
    E, H = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    assert theorem6(E, H, 0.0, 0.2)["max_single_token_success"] == 1.0
    rows = [theorem6(E, H, a, a) for a in (0.5, 1.0, 4.0)]
    bounds = [r["kl_bound"] for r in rows]
    assert bounds[0] > bounds[1] > bounds[2] > 0
    ps = [r["max_single_token_success"] for r in rows]
    assert ps[0] >= ps[1] >= ps[2] >= 1 / 200
    p = max_success(0.05, 1000)
    assert binary_kl(p, 1e-3) == pytest.approx(0.05, abs=1e-6)


def test_cli_prints_every_attack_in_json(plain_dir, weak, capsys, tmp_path):
    obf, _ = weak
    secret = obf.parent / "secret.json"
    argv = ["attack", "all", "--model", str(plain_dir), "--obfuscated", str(obf), "--secret", str(secret),
            "--columns", "32", "--isa-steps", "5", "--ima-steps", "5", "--ima-tokens", "256", "--sequences", "1",
            "--seq-len", "6", "--tfma-tokens", "500", "--isa-shortlist", "8", "--learned-steps", "5",
            "--sda-steps", "3", "--sda-ranks", "16", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"vma", "ia", "nn", "isa", "ima", "tfma", "sda", "behavioural", "anchored", "learned",
                        "decoded", "sda-decoded", "key-regression", "weight-key", "post-norm"}
    for r in out.values():
        assert 0.0 <= r["token_recovery"] <= 1.0 and 0.0 <= r["prompt_token_recovery"] <= 1.0
    other = tmp_path / "other.json"
    obfuscate_checkpoint(plain_dir, tmp_path / "o2", other, WEAK, progress=False)
    assert main(argv[:6] + ["--secret", str(other), "--json"]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err
    with pytest.raises(AloeError):
        Target(plain_dir, tmp_path, Budget())


def test_client_held_vocabulary_keeps_the_logits_and_defeats_the_table_attacks(plain_dir, weak, tmp_path):
    from transformers import AutoModelForCausalLM

    from aloe.attacks.mitigation import ClientVocabulary, split_vocabulary

    obf, tau = weak
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.safetensors")
    assert os.stat(tmp_path / "client.safetensors").st_mode & 0o777 == 0o600
    full = AutoModelForCausalLM.from_pretrained(obf, dtype=torch.float64).eval()
    server = AutoModelForCausalLM.from_pretrained(tmp_path / "server", dtype=torch.float64).eval()
    client = ClientVocabulary(tmp_path / "client.safetensors")
    ids = torch.as_tensor(tau[np.arange(3, 15)])[None]
    with torch.no_grad():
        hidden = server.model(inputs_embeds=client.embed(ids).double()).last_hidden_state
        assert (client.logits(hidden.float()).double() - full(ids).logits).abs().max() < 1e-4
        assert server.model.embed_tokens.weight.abs().max() == 0 and server.lm_head.weight.abs().max() == 0
    names = ["vma", "nn", "ia", "behavioural", "anchored"]
    before = attack(plain_dir, weak, names)
    after = attack(plain_dir, (tmp_path / "server", tau), names)
    for name in names:
        assert before[name]["token_recovery"] >= 0.9 and after[name]["token_recovery"] <= 0.1
    with pytest.raises(AloeError):
        split_vocabulary(obf, tmp_path / "server", tmp_path / "c2.safetensors")


@pytest.mark.parametrize("name", ["nn", "ia", "vma"])
def test_received_rows_still_leak_when_the_keys_are_isometric(plain_dir, weak, tmp_path, name):
    """A client-held vocabulary hides only the rows never sent: the vectors the server receives are, under the
    exact-norm keys, an isometric copy of the plain rows, and the table attacks still match them."""
    from importlib import import_module

    from aloe.attacks.mitigation import received_rows_view, split_vocabulary

    obf, tau = weak
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.safetensors")
    t = Target(plain_dir, tmp_path / "server", Budget(**BUDGET))
    sent_plain = np.arange(3, 80)                       # the client has sent these tokens so far
    received_rows_view(t, obf, tau[sent_plain])
    t.prior_plain_ids = sent_plain
    assert not t.head_held and int(t.held_rows.sum()) == len(sent_plain)
    attack_fn = import_module(f"aloe.attacks.{name}").attack
    guess = attack_fn(t, tau[sent_plain])
    inv = np.empty_like(tau)
    inv[tau] = np.arange(len(tau))
    hit = guess.candidates[:, 0] == inv[guess.obf_ids]
    sent = np.isin(guess.obf_ids, tau[sent_plain])
    assert hit[sent].mean() >= 0.8                      # the received vectors are recovered
    assert (guess.candidates[~sent] == -1).all()         # no claim on rows never sent
    empty = Target(plain_dir, tmp_path / "server", Budget(**BUDGET))
    if name == "nn":
        assert (attack_fn(empty, tau[sent_plain]).candidates == -1).all()  # nothing held, nothing claimed


def test_measured_risk_matches_profiles_exactly(tmp_path):
    from aloe.attacks.risk import measured_risk, table_from_state

    prof = PROFILES["balanced"].to_dict()
    state = {"budget": {"queries": 8}, "profiles": {"balanced": {
        "profile": prof, "fidelity": {"ppl_ratio": 1.5},
        "attacks": {"vma": {"token_recovery": 0.25}, "ima": {"token_recovery": 0.0,
                                                            "known_plaintext": {"token_recovery": 0.5}}}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table_from_state(state)))
    r = measured_risk(dict(prof, name="renamed"), path)
    assert r["status"] == "measured" and r["recovery"] == {"vma": 0.25, "ima": 0.0, "ima_known_plaintext": 0.5}
    assert measured_risk(dict(prof, alpha_e=0.31), path) == {"status": "not measured"}
    assert measured_risk(prof, tmp_path / "missing.json") == {"status": "not measured"}
    # the figures are the measured model's: an artifact of another model does not carry them
    from aloe.obfuscation.commands import risk_line

    path.write_text(json.dumps(table_from_state(state, {"name": "SmolLM2-135M-Instruct", "sha256": "ab" * 32})))
    same = measured_risk(prof, path, source_sha256="ab" * 32)
    assert same["status"] == "measured" and same["measured_on"] == "SmolLM2-135M-Instruct"
    assert "measured as 'balanced' on SmolLM2-135M-Instruct): ima 0.0%" in risk_line(same)
    other = measured_risk(prof, path, source_sha256="cd" * 32)
    assert other == {"status": "not measured", "measured_on": "SmolLM2-135M-Instruct"}
    assert risk_line(other).startswith("privacy risk: not measured for this model (the profiles were measured on "
                                       "SmolLM2-135M-Instruct")


def test_wide_secret_scales_do_not_stop_the_column_normalised_attacks(plain_dir, tmp_path_factory):
    # H_qk and H_ffn are exact, so widening their range costs no fidelity; it is no defence either: each scale
    # multiplies a whole column, which the attacks normalise away.
    wide = deploy(plain_dir, tmp_path_factory, WEAK.with_overrides(name="wide", h=8, qk_scale=(0.25, 4.0),
                                                                   ffn_scale=(0.25, 4.0)))
    r = attack(plain_dir, wide, ["vma", "ia"])
    assert r["vma"]["token_recovery"] >= 0.9
    assert r["ia"]["attention_ia_token_recovery"] >= 0.9


def test_vectors_a_client_holding_the_vocabulary_sends_are_read_one_occurrence_at_a_time(plain_dir, weak, tmp_path):
    """Without occurrence noise every sent vector is read alone, by its invariants and by the states it leads to;
    fresh noise of the rows' own size cuts what each vector gives away."""
    from aloe.attacks.occurrence import attack_vectors, score_occurrences
    from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary

    obf, tau = weak
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.safetensors")
    t = Target(plain_dir, tmp_path / "server", Budget(**BUDGET))
    client = ClientVocabulary(tmp_path / "client.safetensors")
    plain_ids = np.random.default_rng(3).choice(t.movable_ids, size=60)
    clean = attack_vectors(t, client.embed(tau[plain_ids]), 0.0)
    assert set(clean) == {"ia", "states", "combined"} and clean["combined"].shape == (60, 5)
    for family in ("ia", "states", "combined"):
        assert score_occurrences(clean[family], plain_ids)["occurrence_recovery"] >= 0.9
    client = ClientVocabulary(tmp_path / "client.safetensors", occurrence_noise=3.0)
    noisy = score_occurrences(attack_vectors(t, client.embed(tau[plain_ids]), 3.0)["combined"], plain_ids)
    assert noisy["occurrences"] == 60 and noisy["occurrence_recovery"] < 0.6


def test_a_stream_level_server_links_the_occurrences_of_one_token_and_reads_their_mean(plain_dir, weak, tmp_path):
    """Fresh noise does not hide which occurrences share a token: the pair ratios of one token's occurrences sit at
    the level the public alpha predicts, so the server clusters them, and each cluster's mean carries less noise than
    any one of its vectors."""
    from aloe.attacks.occurrence import (
        attack_linked,
        attack_vectors,
        link_occurrences,
        link_threshold,
        score_links,
        score_occurrences,
    )
    from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary

    obf, tau = weak
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.safetensors")
    t = Target(plain_dir, tmp_path / "server", Budget(**BUDGET))
    tokens = np.random.default_rng(5).choice(t.movable_ids, size=12, replace=False)
    # 12 occurrences a token: with 6, a cluster's mean was read or not on a coin flip and the gain below fell under
    # 0.3 on about one fresh draw of the keys and noise in three (over 20 draws at 12: 0.51 to 0.88)
    plain_ids = np.random.default_rng(6).permutation(tokens.repeat(12))
    alpha = 1.0  # each vector alone is read about 5% of the time here
    vectors = ClientVocabulary(tmp_path / "client.safetensors", occurrence_noise=alpha).embed(tau[plain_ids])
    cal = link_threshold(t, alpha)
    assert cal["same_pairs_missed"] + cal["other_pairs_linked"] < 0.2
    links = score_links(link_occurrences(vectors, cal["threshold"]), plain_ids)
    assert links["link_recall"] >= 0.8 and links["link_precision"] >= 0.8
    alone = score_occurrences(attack_vectors(t, vectors, alpha)["combined"], plain_ids)["occurrence_recovery"]
    linked = attack_linked(t, vectors, alpha)
    assert linked["candidates"].shape == (144, 5) and len(linked["labels"]) == 144
    together = score_occurrences(linked["candidates"], plain_ids)["occurrence_recovery"]
    assert links["clusters"] >= 10 and together >= alone + 0.3

"""``aloe attack``, ``aloe attack-client-held`` and ``aloe privacy-bound``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import nonnegative_float, nonnegative_int, positive_int
from aloe.attacks.common import Budget
from aloe.attacks.key_regression import STARTS as KEYREG_STARTS
from aloe.attacks.suite import ATTACKS


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(queries=args.queries, layers=args.layers, columns=args.columns, topk=args.topk,
                  sequences=args.sequences, seq_len=args.seq_len, isa_steps=args.isa_steps, isa_layer=args.isa_layer,
                  isa_shortlist=args.isa_shortlist,
                  ima_tokens=args.ima_tokens, ima_steps=args.ima_steps, tfma_tokens=args.tfma_tokens,
                  sda_steps=args.sda_steps, sda_ranks=args.sda_ranks,
                  behaviour_rows=args.behaviour_rows, behaviour_queries=args.behaviour_queries,
                  learned_steps=args.learned_steps, learned_state_ids=args.learned_state_ids,
                  learned_draws=args.learned_draws, anchored_contexts=args.anchored_contexts,
                  anchored_rounds=args.anchored_rounds, decode_stream=args.decode_stream,
                  decode_sweeps=args.decode_sweeps, decode_monotone=args.decode_monotone,
                  decode_em=args.decode_em, decode_sequential=args.decode_sequential,
                  decode_temperature=args.decode_temperature, decode_beam=args.decode_beam,
                  decode_swaps=args.decode_swaps,
                  decode_from_victim=args.decode_from_victim, decode_completion=args.decode_completion,
                  keyreg_rounds=args.keyreg_rounds, keyreg_start=args.keyreg_start, seed=args.attacker_seed)


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (defaults: full vocabulary, all layers)")
    g.add_argument("--queries", type=nonnegative_int, default=0, help="obfuscated ids attacked (0 = every movable id)")
    g.add_argument("--layers", type=nonnegative_int, default=0, help="layers used by VMA/IA (0 = all)")
    g.add_argument("--columns", type=positive_int, default=256, help="sampled columns per sorted row (VMA)")
    g.add_argument("--topk", type=positive_int, default=10)
    g.add_argument("--sequences", type=positive_int, default=4, help="random-id sequences for ISA/IMA")
    g.add_argument("--seq-len", type=positive_int, default=16)
    g.add_argument("--isa-steps", type=nonnegative_int, default=60)
    g.add_argument("--isa-layer", type=nonnegative_int, default=1)
    g.add_argument("--isa-shortlist", type=positive_int, default=256)
    g.add_argument("--ima-tokens", type=positive_int, default=4096)
    g.add_argument("--ima-steps", type=nonnegative_int, default=300)
    g.add_argument("--tfma-tokens", type=positive_int, default=20000)
    g.add_argument("--sda-steps", type=nonnegative_int, default=2000, help="training steps of the SDA translator")
    g.add_argument("--sda-ranks", type=positive_int, default=1024,
                   help="frequency ranks SDA encodes one by one (rarer ids: buckets by count)")
    g.add_argument("--behaviour-rows", type=nonnegative_int, default=0,
                   help="single-token contexts per side (0 = queries)")
    g.add_argument("--behaviour-queries", type=nonnegative_int, default=0,
                   help="ids given an input-side pass (0 = queries)")
    g.add_argument("--learned-steps", type=nonnegative_int, default=400, help="training steps of the learned matcher")
    g.add_argument("--learned-state-ids", type=int, default=0,
                   help="ids given a forward pass for the learned states block (0 = all attacked ids, -1 = none)")
    g.add_argument("--learned-draws", type=positive_int, default=2,
                   help="own copies the learned matcher trains on (the last validates when 2+)")
    g.add_argument("--anchored-contexts", type=positive_int, default=1024,
                   help="contexts of fixed special ids run on each side (anchored logit matching)")
    g.add_argument("--anchored-rounds", type=positive_int, default=2,
                   help="bootstrap rounds of anchored matching (the best-matched ids become anchors)")
    g.add_argument("--decode-stream", type=positive_int, default=2000,
                   help="ids of the victim's stream decoded besides its prompts (decoded)")
    g.add_argument("--decode-sweeps", type=nonnegative_int, default=8,
                   help="most sweeps of the decoder's search over the candidates (decoded, sda-decoded)")
    g.add_argument("--decode-monotone", action="store_true",
                   help="keep a decoder sweep's moves only where they raise the language model's log-probability "
                        "of the traffic (plus the rank prior); else halve them")
    g.add_argument("--decode-em", type=nonnegative_int, default=0, metavar="N",
                   help="decode by N EM iterations over a bigram view of the public model (forward-backward over "
                        "every neighbour's candidates) instead of the sweeps; 0 = off")
    g.add_argument("--decode-sequential", action="store_true",
                   help="decode one cluster at a time against its neighbours' latest choices, drawing each choice "
                        "at a temperature falling to 0 over the sweeps (Gibbs sampling with annealing)")
    g.add_argument("--decode-temperature", type=nonnegative_float, default=1.0,
                   help="start temperature of --decode-sequential (0: greedy at every sweep)")
    g.add_argument("--decode-beam", type=nonnegative_int, default=0, metavar="W",
                   help="decode by a beam search of W one-to-one readings instead (the most frequent ids placed "
                        "first; at most --decode-sweeps passes); 0 = off")
    g.add_argument("--decode-swaps", type=nonnegative_int, default=0, metavar="N",
                   help="then N sweeps of a search over one-to-one readings only, from the decoder's reading: an id "
                        "moves to a token no other id reads, or swaps tokens with the id that reads it; 0 = off")
    g.add_argument("--decode-from-victim", type=nonnegative_int, default=0, metavar="N",
                   help="a measurement with the secret, after the attack: N sweeps of that one-to-one search from "
                        "the victim's reading wherever it is among the candidates (readings.from_victim); 0 = off")
    g.add_argument("--decode-completion", type=nonnegative_int, default=0, metavar="N",
                   help="a measurement with the secret, after the attack: N sweeps of that one-to-one search that "
                        "hold the victim's token wherever it is among the candidates and complete the other ids "
                        "(readings.victim_completion); 0 = off")
    g.add_argument("--keyreg-rounds", type=positive_int, default=3, metavar="N",
                   help="rounds of the key regression: fit the key on the start's reading (--keyreg-start; then "
                        "on its own), read every row through it (key-regression)")
    g.add_argument("--keyreg-start", default="learned", metavar="NAME", choices=KEYREG_STARTS,
                   help="the per-id attack whose first choices start the key regression: "
                        f"{', '.join(KEYREG_STARTS)} (default learned)")
    g.add_argument("--attacker-seed", type=int, default=None, help="seed of the attacker's own (non-secret) draws")


def _attack(args: argparse.Namespace) -> int:
    from aloe.attacks.common import Target
    from aloe.attacks.suite import run, texts_for
    from aloe.cli import print_json
    from aloe.obfuscation.commands import resolve_model
    from aloe.obfuscation.secret import check_artifact_secret, load_secret

    model = resolve_model(args.model)
    secret = load_secret(args.secret)
    check_artifact_secret(args.obfuscated, secret)
    target = Target(model, args.obfuscated, budget_from_args(args))
    names = list(ATTACKS) if args.name == "all" else [args.name]
    res = run(target, names, secret.tau, texts_for(target), progress=not args.json)
    if args.json:
        print_json(res)
    else:
        for name, r in res.items():
            print(f"{name:12s} token_recovery {r['token_recovery']:.4f}  prompt_token_recovery "
                  f"{r['prompt_token_recovery']:.4f}  ({r['seconds']:.0f}s)")
    return 0


def _attack_client_held(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from aloe.attacks import client_held, weight_key
    from aloe.attacks.common import Target
    from aloe.attacks.suite import texts_for
    from aloe.cli import print_json
    from aloe.obfuscation.client_vocab import ClientVocabulary
    from aloe.obfuscation.commands import resolve_model
    from aloe.obfuscation.fidelity import PROMPTS
    from aloe.obfuscation.secret import check_artifact_secret, load_secret

    if args.beam < 1 or args.draws < 1 or args.answer_prompts < 0 or args.new_tokens < 1:
        raise AloeError("--beam, --draws and --new-tokens must be >= 1, --answer-prompts >= 0")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:
        raise AloeError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.top_k < 0 or not args.repetition_penalty > 0:
        raise AloeError("--top-k must be >= 0 and --repetition-penalty > 0")
    if not 0 <= args.min_p <= 1 or not all(-2 <= v <= 2 for v in (args.presence_penalty, args.frequency_penalty)):
        raise AloeError("--min-p must lie in [0, 1], --presence-penalty and --frequency-penalty in [-2, 2]")
    sampling = (dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or -1, min_p=args.min_p,
                     repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                     frequency_penalty=args.frequency_penalty) if args.temperature > 0 else None)
    model = resolve_model(args.model)
    secret = load_secret(args.secret)
    check_artifact_secret(args.server, secret)
    client = ClientVocabulary(args.client_vocab, occurrence_noise=args.occurrence_noise)
    if client.fingerprint != secret.fingerprint:
        raise AloeError(f"{args.client_vocab} does not belong to this secret (fingerprint mismatch)")
    target = Target(model, args.server, budget_from_args(args))
    if not target.client_held:
        raise AloeError(f"{args.server} holds its vocabulary tables: attack it with `aloe attack`")
    show = not args.json
    alpha = client.occurrence_noise
    texts = texts_for(target)
    key = weight_key.recover(target)
    with tqdm(desc="prompts", disable=not show, leave=False) as bar:
        prompts = client_held.prompt_reads(target, key, client, secret.tau, texts.prompts, texts.prior, alpha,
                                           "row", args.beam, args.draws, progress=bar)
    if (Path(model) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        plain = client_held.chat_prompt_ids(AutoTokenizer.from_pretrained(str(model)), PROMPTS[:args.answer_prompts])
    else:     # a model without a tokenizer: the suite's own prompts
        plain = texts.prompts[:args.answer_prompts]
    with tqdm(total=len(plain), desc="answers", disable=not show, leave=False) as bar:
        answers = client_held.answer_reads(target, key, args.server, client, secret.tau,
                                           [secret.tau[x] for x in plain], args.new_tokens, progress=bar,
                                           sampling=sampling)
    how = "a greedy" if sampling is None else (f"a sampling (temperature {args.temperature:g}, top-p {args.top_p:g}, "
                                               f"top-k {args.top_k or 'off'}, min-p {args.min_p:g}, repetition "
                                               f"penalty {args.repetition_penalty:g}, presence penalty "
                                               f"{args.presence_penalty:g}, frequency penalty "
                                               f"{args.frequency_penalty:g})")
    res = {"occurrence_noise": alpha, "key": key.summary(), "prompts": prompts, "answers": answers,
           "texts": texts.source}
    if args.json:
        print_json(res)
    else:
        print(f"occurrence noise {alpha}: prompt occurrences read {100 * prompts['occurrence_recovery']:.1f}% "
              f"decoded as text, {100 * prompts['alone_same_draw']:.1f}% one vector at a time "
              f"(the public model alone: {100 * prompts['language_model_alone']:.1f}%); answer tokens read "
              f"{100 * answers['answer_recovery']:.1f}% from the returned states, "
              f"{100 * answers['answer_recovery_with_echo']:.1f}% with the vector each comes back as "
              f"({answers['answer_tokens']} tokens, {how} client)")
    return 0


def _bound(args: argparse.Namespace) -> int:
    import torch

    from aloe.attacks.theorem6 import theorem6
    from aloe.cli import print_json
    from aloe.obfuscation.checkpoint import CheckpointReader, read_config
    from aloe.obfuscation.commands import resolve_model

    model = resolve_model(args.model)
    read_config(model)
    reader = CheckpointReader(model)
    embed = torch.from_numpy(reader.get("model.embed_tokens.weight")).float()
    head_name = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    head = torch.from_numpy(reader.get(head_name)).float() * torch.from_numpy(reader.get("model.norm.weight")).float()
    rows = [theorem6(embed, head, ae, ah) for ae in args.alpha_e for ah in args.alpha_h]
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            b = r["kl_bound"]
            print(f"alpha_e {r['alpha_e']:<5} alpha_h {r['alpha_h']:<5} KL bound {b if math.isinf(b) else round(b, 4)}"
                  f"  max single-token success {r['max_single_token_success']:.4g}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="AloePri: run privacy attacks on an obfuscated artifact and score them")
    p.add_argument("name", choices=[*ATTACKS, "all"])
    p.add_argument("--model", required=True, help="plain model folder, or 'smollm2'")
    p.add_argument("--obfuscated", type=Path, required=True)
    p.add_argument("--secret", type=Path, required=True, help="the client's secret (used only to score)")
    add_budget_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_attack)

    c = sub.add_parser("attack-client-held",
                       help="AloePri: what a server reads of a client-held-vocabulary deployment (its prompts and the "
                            "answers) through the key its body gives")
    c.add_argument("--model", required=True, help="plain model folder, or 'smollm2'")
    c.add_argument("--server", type=Path, required=True, help="the server folder of aloe obfuscate --client-vocab")
    c.add_argument("--client-vocab", type=Path, required=True, help="the client vocabulary file")
    c.add_argument("--secret", type=Path, required=True, help="the client's secret (used only to score)")
    c.add_argument("--occurrence-noise", type=float, default=None, help="override the client file's level")
    c.add_argument("--beam", type=int, default=4, help="prefixes kept by the decoding of the prompts")
    c.add_argument("--draws", type=int, default=1, help="fresh draws of the prompt vectors decoded")
    c.add_argument("--answer-prompts", type=int, default=8, help="chat prompts the client answers")
    c.add_argument("--new-tokens", type=int, default=64, help="tokens per answer")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="the client's sampling temperature (0: greedy, the default)")
    c.add_argument("--top-p", type=float, default=1.0, help="the client's nucleus sampling (with --temperature > 0)")
    c.add_argument("--top-k", type=int, default=0, help="the client's top-k (with --temperature > 0; 0: off)")
    c.add_argument("--min-p", type=float, default=0.0, help="the client's min-p (with --temperature > 0; 0: off)")
    c.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="the client's repetition penalty (with --temperature > 0; 1: none)")
    c.add_argument("--presence-penalty", type=float, default=0.0,
                   help="the client's OpenAI presence penalty (with --temperature > 0)")
    c.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="the client's OpenAI frequency penalty (with --temperature > 0)")
    add_budget_flags(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_attack_client_held)

    b = sub.add_parser("privacy-bound", help="AloePri: Theorem 6 bound on single-token recovery for alpha_e/alpha_h")
    b.add_argument("--model", required=True, help="plain model folder, or 'smollm2'")
    b.add_argument("--alpha-e", type=nonnegative_float, nargs="+", default=[1.0])
    b.add_argument("--alpha-h", type=nonnegative_float, nargs="+", default=[0.2])
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bound)

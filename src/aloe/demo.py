"""``aloe demo``: the main job of the README."""

from __future__ import annotations

import argparse

QUESTION = "What is the capital of France?"


def plain_answer(model_path: str, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of the plain model to one chat turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _demo(args: argparse.Namespace) -> int:
    from aloe.assets.smollm2 import build_smollm2

    built = build_smollm2(progress=True)
    print(f"model: {built.path} ({built.n_params:,} parameters)")
    print(f"user: {args.question}")
    print(f"assistant: {plain_answer(built.path, args.question)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main demo")
    p.add_argument("--question", default=QUESTION)
    p.set_defaults(func=_demo)

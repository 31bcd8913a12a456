"""Bad numbers on the ``aloe`` command line are refused by the parser in one line (exit 2), before any work starts:
no traceback, no degenerate run (a 0 x 0 session matrix trained to recall 0, a negative epoch count)."""

import argparse

import pytest

from aloe.argtypes import nonnegative_float, nonnegative_int, port_number, positive_float, positive_int
from aloe.cli import main as aloe_main


@pytest.mark.parametrize("kind,good,bad", [
    (positive_int, [("1", 1), ("4096", 4096)], ["0", "-3", "1.5", "x", ""]),
    (nonnegative_int, [("0", 0), ("7", 7)], ["-1", "2.0", "nan"]),
    (positive_float, [("3e-3", 3e-3), ("1", 1.0)], ["0", "-1", "inf", "nan", "fast"]),
    (nonnegative_float, [("0", 0.0), ("0.5", 0.5)], ["-0.1", "-inf", "nan"]),
    (port_number, [("1", 1), ("65535", 65535)], ["0", "65536", "99999", "http"]),
])
def test_argument_types(kind, good, bad):
    for text, value in good:
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


@pytest.mark.parametrize("argv,reason", [
    (["labelmap", "train", "--task", "synthetic", "--method", "lm-nt", "--epochs", "-1"],
     "--epochs: -1 is not positive"),
    (["labelmap", "train", "--task", "synthetic", "--method", "lm-nt", "--lr", "0"], "--lr: 0 is not positive"),
    (["labelmap", "map", "--classes", "100", "--units", "20", "--order", "0"], "--order: 0 is not positive"),
    (["recsys", "train", "--data", "ml100k", "--model", "matrix", "--matrix-dim", "0"], "--matrix-dim: 0 is not"),
    (["recsys", "train", "--data", "ml100k", "--model", "matrix", "--lr", "nan"], "--lr: 'nan' is not a finite"),
    (["recsys", "interests", "--data", "ml100k", "--items", "0"], "--items: 0 is not positive"),
    (["mpc", "train", "--model", "lr", "--lr", "-1"], "--lr: -1 is not positive"),
    (["serve", "folder", "--port", "70000"], "--port: port 70000 is outside 1-65535"),
    (["serve", "folder", "--max-prompt-tokens", "0"], "--max-prompt-tokens: 0 is not positive"),
    (["obfuscate", "m", "out", "--secret", "s", "--max-shard-mb", "0"], "--max-shard-mb: 0 is not positive"),
    (["proxy", "--server", "http://127.0.0.1:1", "--secret", "s", "--tokenizer", "t", "--port", "x"],
     "--port: 'x' is not a port number"),
    (["attack", "nn", "--model", "m", "--obfuscated", "o", "--secret", "s", "--queries", "-1"],
     "--queries: -1 is negative"),
    (["attack", "nn", "--model", "m", "--obfuscated", "o", "--secret", "s", "--topk", "0"],
     "--topk: 0 is not positive"),
    (["attack", "vma", "--model", "m", "--obfuscated", "o", "--secret", "s", "--layers", "-2"],
     "--layers: -2 is negative"),
    (["attack", "learned", "--model", "m", "--obfuscated", "o", "--secret", "s", "--learned-draws", "0"],
     "--learned-draws: 0 is not positive"),
    (["attack", "key-regression", "--model", "m", "--obfuscated", "o", "--secret", "s", "--keyreg-rounds", "0"],
     "--keyreg-rounds: 0 is not positive"),
    (["privacy-bound", "--model", "m", "--alpha-e", "0.5", "-1"], "--alpha-e: -1 is negative"),
    (["fidelity", "--model", "m", "--obfuscated", "o", "--secret", "s", "--tokens", "0"], "--tokens: 0 is not"),
    (["fidelity", "--model", "m", "--obfuscated", "o", "--secret", "s", "--prompts", "-1"], "--prompts: -1 is not"),
    (["complete", "--server", "http://127.0.0.1:1", "--secret", "s", "--tokenizer", "t", "--max-tokens", "0", "hi"],
     "--max-tokens: 0 is not positive"),
])
def test_the_parser_refuses_bad_numbers_in_one_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        aloe_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and reason in err and "Traceback" not in err


def test_an_unknown_map_kind_is_named_before_the_budget_is_checked(capsys):
    assert aloe_main(["labelmap", "map", "--kind", "zz", "--classes", "100", "--units", "10"]) == 2
    assert capsys.readouterr().err.strip() == "aloe: error: unknown map kind 'zz'; choose one of nt, it, mach"

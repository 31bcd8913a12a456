"""The untrusted side on a tiny obfuscated model: the embedded server + client give the plain model's tokens;
the request parser answers malformed input with 4xx and stays up; a bounded concurrent load succeeds."""

import json
import resource
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from aloe import AloeError
from aloe.obfuscation.client import PrivateClient
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.serving.local import server_thread
from aloe.serving.server import Limits, create_app
from obfuscation_helpers import tiny_model


class IdTokenizer:
    """A stand-in for the plain tokenizer of a tiny random model: ids are their own text."""

    def apply_chat_template(self, messages, **kw):
        return {"input_ids": [5 + (ord(c) % 80) for c in messages[-1]["content"]]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    plain_dir = tiny_model("llama-gqa-tied", tmp / "plain")
    (plain_dir / "generation_config.json").write_text('{"eos_token_id": 2, "bos_token_id": 1}')
    prof = PROFILES["exact"].with_overrides(name="exact-tiny", h=8)
    obfuscate_checkpoint(plain_dir, tmp / "obf", tmp / "secret.json", prof, progress=False)
    return plain_dir, tmp / "obf", tmp / "secret.json"


def plain_greedy(plain_dir, ids, n):
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=2, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_client_through_server_matches_plain_greedy(tiny_artifact):
    plain_dir, obf_dir, secret = tiny_artifact
    with server_thread(obf_dir) as url:
        client = PrivateClient(url, secret, IdTokenizer())
        client.verify()
        prompt = [7, 33, 12, 80, 41]
        res = client.complete(prompt, max_tokens=12, temperature=0.0)
        assert res.token_ids == plain_greedy(plain_dir, prompt, 12)
        assert res.server_prompt_ids == client.map.to_server(prompt) and res.server_prompt_ids != prompt
        assert res.server_output_ids == client.map.to_server(res.token_ids)  # the server spoke obfuscated ids
        streamed = "".join(client.stream(prompt, max_tokens=12))
        assert streamed.split() == [str(i) for i in res.token_ids]
        # a stop token id is mapped for the server and honoured
        stop = res.token_ids[3]
        short = client.complete(prompt, max_tokens=12, stop_token_ids=[stop])
        assert short.token_ids == res.token_ids[:res.token_ids.index(stop)] and short.finish_reason == "stop"
        # sampling with a seed is reproducible through the server
        a = client.complete(prompt, max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=11)
        b = client.complete(prompt, max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=11)
        assert a.token_ids == b.token_ids
        assert res.timings["client_map_seconds"] < 0.01
        with pytest.raises(AloeError, match="stop strings"):
            client.complete(prompt, stop=["\n"])


def test_penalties_and_min_p_through_the_server_match_the_plain_model(tiny_artifact):
    """OpenAI's presence and frequency penalties count ids, so they commute with the permutation: the greedy answer
    under them through the obfuscated server is the plain model's under the same processor; min-p 1 leaves only the
    likeliest token, so sampling with it is greedy."""
    from transformers import LogitsProcessorList

    from aloe.obfuscation.client import OutputPenalty

    plain_dir, obf_dir, secret = tiny_artifact
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    prompt = [7, 33, 12, 80, 41]
    x = torch.tensor([prompt])

    def plain(presence, frequency):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             eos_token_id=2, pad_token_id=2,
                             logits_processor=LogitsProcessorList([OutputPenalty(presence, frequency)]))
        return out[0, len(prompt):].tolist()

    with server_thread(obf_dir) as url:
        client = PrivateClient(url, secret, IdTokenizer())
        greedy = client.complete(prompt, max_tokens=16, temperature=0.0).token_ids
        penalised = client.complete(prompt, max_tokens=16, temperature=0.0, presence_penalty=1.0,
                                    frequency_penalty=2.0).token_ids
        assert penalised == plain(1.0, 2.0)
        assert len(set(penalised)) > len(set(greedy)), (greedy, penalised)   # the tiny model repeats itself
        assert client.complete(prompt, max_tokens=16, temperature=1.0, min_p=1.0, seed=4).token_ids == greedy
        for bad in (dict(min_p=1.5), dict(presence_penalty=-2.5), dict(frequency_penalty=3.0), dict(top_p=0.0),
                    dict(repetition_penalty=0.0)):
            with pytest.raises(AloeError, match=next(iter(bad))):
                client.complete(prompt, max_tokens=4, **bad)


def test_logit_bias_comes_before_the_repetition_penalty(tiny_artifact):
    """The server applies logit_bias before the penalties, as llama.cpp, vLLM and the client's own sampler do (the
    repetition penalty scales a logit, so the order shows): the greedy answer through the obfuscated server is the
    plain model's with the bias first, not with the penalty first."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from aloe.serving.server import _Bias

    plain_dir, obf_dir, secret = tiny_artifact
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    prompt = [7, 33, 12, 80, 41]
    x = torch.tensor([prompt])

    def plain(*processors):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             eos_token_id=2, pad_token_id=2, logits_processor=LogitsProcessorList(processors))
        return out[0, len(prompt):].tolist()

    favoured = plain()[0]   # the greedy answer repeats it; a small bias keeps it on top only with the penalty first
    bias, rep = {favoured: 0.3}, RepetitionPenaltyLogitsProcessor(3.0)
    bias_first, penalty_first = plain(_Bias(bias), rep), plain(rep, _Bias(bias))
    assert bias_first != penalty_first   # the order matters here
    with server_thread(obf_dir) as url:
        client = PrivateClient(url, secret, IdTokenizer())
        got = client.complete(prompt, max_tokens=16, temperature=0.0, repetition_penalty=3.0, logit_bias=bias)
        assert got.token_ids == bias_first


def test_logprobs_are_the_plain_models_own_through_the_obfuscated_server(tiny_artifact):
    """logprobs k: each answer token's log-probability under the model and the k likeliest, which the server computes
    over obfuscated ids and the client maps back: they are the plain model's own (exact profile), streamed or not,
    and the sampling settings do not change them (raw log-probabilities, as vLLM returns by default)."""
    plain_dir, obf_dir, secret = tiny_artifact
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    prompt = [7, 33, 12, 80, 41]
    with server_thread(obf_dir) as url:
        client = PrivateClient(url, secret, IdTokenizer())
        res = client.complete(prompt, max_tokens=6, temperature=0.0, logprobs=3)
        assert len(res.logprobs) == len(res.token_ids) == 6
        with torch.no_grad():
            rows = torch.log_softmax(model(torch.tensor([prompt + res.token_ids])).logits[0].double(), -1)
        for n, (pid, (own, top)) in enumerate(zip(res.token_ids, res.logprobs, strict=True)):
            row = rows[len(prompt) - 1 + n]
            assert abs(own - float(row[pid])) < 1e-4
            want = row.topk(3).indices.tolist()
            assert list(top) == want and all(abs(top[i] - float(row[i])) < 1e-4 for i in want)   # greedy: in top 1
        stream = client.open_stream(prompt, max_tokens=6, temperature=0.0, logprobs=3)
        assert list(stream) == res.token_ids and stream.logprobs == res.logprobs
        sampled = client.complete(prompt, max_tokens=6, temperature=1.5, top_k=5, seed=2, logprobs=0)
        for n, (pid, (own, top)) in enumerate(zip(sampled.token_ids, sampled.logprobs, strict=True)):
            with torch.no_grad():
                row = torch.log_softmax(model(torch.tensor([prompt + sampled.token_ids[:n]])).logits[0, -1].double(),
                                        -1)
            assert abs(own - float(row[pid])) < 1e-4 and list(top) == [pid]   # k = 0: the chosen token only
        assert client.complete(prompt, max_tokens=2).logprobs is None
        with pytest.raises(AloeError, match="logprobs must be an integer in"):
            client.complete(prompt, max_tokens=2, logprobs=21)


def test_output_penalty_counts_the_reply_only():
    from aloe.obfuscation.client import OutputPenalty, Sampler

    pen = OutputPenalty(0.5, 2.0)
    scores = torch.zeros(1, 10)
    assert torch.equal(pen(torch.tensor([[5, 5, 7]]), scores.clone()), scores)   # the prompt is not counted
    got = pen(torch.tensor([[5, 5, 7, 9, 9, 3]]), scores.clone())[0]
    want = torch.zeros(10)
    want[9], want[3] = -(2 * 2.0 + 0.5), -(2.0 + 0.5)
    assert torch.equal(got, want)
    # the client's sampler (embeds mode): min-p 1 is the greedy pick, and the penalties move it off a repeated id
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    body = dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, min_p=1.0, seed=None)
    assert {Sampler(body)([0], logits) for _ in range(20)} == {1}
    pick = Sampler(dict(body, frequency_penalty=1.0))
    assert pick([0], logits) == 1 and pick([0, 1], logits) == 2


def test_client_refuses_a_server_with_another_secret(tiny_artifact, tmp_path):
    plain_dir, obf_dir, _ = tiny_artifact
    prof = PROFILES["exact"].with_overrides(name="exact-tiny", h=8)
    obfuscate_checkpoint(plain_dir, tmp_path / "other", tmp_path / "other.json", prof, progress=False)
    with server_thread(obf_dir) as url:
        with pytest.raises(AloeError, match="fingerprint mismatch"):
            PrivateClient(url, tmp_path / "other.json", IdTokenizer()).verify()


@pytest.fixture(scope="module")
def app_client(tiny_artifact):
    _, obf_dir, _ = tiny_artifact
    return TestClient(create_app(obf_dir, Limits(max_prompt_tokens=64, max_new_tokens=32)))


@pytest.mark.parametrize("body,status,reason", [
    (b"{not json", 422, "JSON"),
    (b'{"prompt": "some text"}', 422, "prompt"),
    (b'{"prompt": []}', 422, "prompt"),
    (b'{"prompt": [1, 2, 99999]}', 422, "outside the vocabulary"),
    (b'{"prompt": [1, -3]}', 422, "outside the vocabulary"),
    (b'{"prompt": [1, 2], "max_tokens": 100000000}', 422, "max_tokens"),
    (b'{"prompt": [1, 2], "temperature": -1}', 422, "temperature"),
    (b'{"prompt": [1, 2], "n": 3}', 422, "n"),
    (b'{"prompt": [1, 2], "grammar": "root ::= x"}', 422, "grammar"),
    (b'{"prompt": [1, 2], "stop_token_ids": [500]}', 422, "outside the vocabulary"),
    (b'{"prompt": [1, 2], "logprobs": 21}', 422, "logprobs"),
    (b'{"prompt": [1, 2], "logprobs": -1}', 422, "logprobs"),
    (b'{"prompt": ' + str(list(range(1, 90))).encode() + b"}", 422, "limit"),
])
def test_malformed_requests_get_4xx_with_a_reason(app_client, body, status, reason):
    r = app_client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert reason.lower() in r.json()["error"]["message"].lower()
    assert app_client.get("/health").status_code == 200


def test_logprobs_in_vllms_completion_format(app_client):
    """vLLM's completion logprobs: per token its own log-probability and the k likeliest, the token named as
    ``token_id:N`` (this artifact has no tokenizer; vLLM's ``return_tokens_as_token_ids``), streamed or not."""
    whole = app_client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0,
                                                      "logprobs": 2}).json()["choices"][0]
    lp = whole["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in whole["token_ids"]] and len(lp["token_logprobs"]) == 3
    for own, top, tok in zip(lp["token_logprobs"], lp["top_logprobs"], lp["tokens"], strict=True):
        assert len(top) == 2 and top[tok] == own == max(top.values()) and own < 0   # greedy: the likeliest
    with app_client.stream("POST", "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0,
                                                            "logprobs": 2, "stream": True}) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["token_ids"]]
    assert [x["token_logprobs"][0] for x in streamed] == lp["token_logprobs"]
    assert app_client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1}).json()["choices"][0][
        "logprobs"] is None


def test_oversized_body_is_refused(app_client):
    r = app_client.post("/v1/completions", content=b"[" + b"1," * 600_000 + b"1]",
                        headers={"content-type": "application/json"})
    assert r.status_code == 413


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(scalars,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                             "stream", "stop_token_ids", "logit_bias", "model", "x"]),
                            json_values, max_size=6))
def test_fuzzed_requests_never_crash_the_server(app_client, body):
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["error"]["message"]


def test_bounded_concurrent_load_has_no_failures(tiny_artifact):
    _, obf_dir, _ = tiny_artifact
    failures, done = [], []
    with server_thread(obf_dir, Limits(max_waiting=16)) as url:
        def worker(k):
            with httpx.Client(timeout=60) as http:
                for j in range(6):
                    r = http.post(url + "/v1/completions", json={"prompt": [3 + k, 4 + j, 5], "max_tokens": 6,
                                                                 "temperature": 0.7, "seed": k * 100 + j,
                                                                 "stream": bool(j % 2)})
                    (done if r.status_code == 200 else failures).append(r.status_code)

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert failures == [] and len(done) == 48
    assert rss1 - rss0 < 200_000  # KiB: no runaway growth over 48 requests


def test_serve_refuses_a_broken_folder_and_bad_numbers_in_one_line(tiny_artifact, tmp_path, capsys):
    """A folder whose config, weights or tokenizer cannot be loaded, a port outside 1-65535 and a zero thread count:
    each a one-line error from ``aloe serve`` (exit 2), no traceback."""
    import shutil

    from aloe.cli import main as aloe_main

    obf_dir = tiny_artifact[0]
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{")
    truncated = tmp_path / "truncated"
    shutil.copytree(obf_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for folder, reason in ((bad_config, "JSON"), (truncated, "")):
        with pytest.raises(AloeError, match=f"cannot load the model in {folder}.*{reason}"):
            create_app(folder)
        assert aloe_main(["serve", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("aloe: error: cannot load the model") and "\n" not in err and "Traceback" not in err
    for args, reason in ((["--port", "99999"], "outside 1-65535"), (["--port", "http"], "not a port number"),
                         (["--threads", "0"], "not positive"), (["--max-new-tokens", "-3"], "not positive")):
        with pytest.raises(SystemExit) as exc:
            aloe_main(["serve", str(obf_dir), *args])
        assert exc.value.code == 2 and reason in capsys.readouterr().err

"""``aloe proxy`` in front of ``aloe serve`` on obfuscated SmolLM2: the stock ``openai`` package talks plain text to
the proxy and gets the plain model's answer while the server receives only obfuscated ids; stop strings cut on the
plain side; faults give one-line JSON errors; the chat page works in a real headless browser."""

import asyncio
import contextlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from aloe.attacks.risk import TABLE
from aloe.cli import main as aloe_main
from aloe.obfuscation.client import IncrementalDecoder, TokenMap
from aloe.obfuscation.secret import Secret, load_secret, save_secret
from aloe.serving.local import app_thread, free_port, wait_healthy
from aloe.serving.proxy import StopCutter, connect, create_proxy_app
from aloe.serving.server import Limits, create_app
from server_recording import Recorder, assert_server_saw_only_obfuscated_ids

pytestmark = pytest.mark.real_model
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def stack(smollm2_exact, smollm2_path):
    """One untrusted server (recording what it receives) and one proxy in front of it, for the whole module."""
    obf_dir, secret = smollm2_exact
    recorder = Recorder(create_app(obf_dir, Limits(max_new_tokens=64)))
    with app_thread(recorder) as server_url:
        client = connect(server_url, secret, smollm2_path, timeout=120.0)
        with app_thread(create_proxy_app(client), health="/v1/models") as proxy_url:
            yield {"proxy": proxy_url, "server": server_url, "recorder": recorder, "client": client}


@pytest.fixture(scope="module")
def openai_client(stack):
    import openai

    return openai.OpenAI(base_url=stack["proxy"] + "/v1", api_key="unused", max_retries=0, timeout=120.0)


def test_openai_package_chat_non_streaming_and_streaming(stack, openai_client):
    since = len(stack["recorder"].bodies)
    models = openai_client.models.list()
    assert [m.id for m in models.data]
    res = openai_client.chat.completions.create(model=models.data[0].id, temperature=0, max_tokens=16,
                                                messages=[{"role": "user", "content": QUESTION}])
    answer = res.choices[0].message.content
    assert "Paris" in answer, answer
    assert res.usage.prompt_tokens > 5 and 1 <= res.usage.completion_tokens <= 16
    pieces, finish, usage = [], None, None
    for chunk in openai_client.chat.completions.create(model="any", temperature=0, max_tokens=16, stream=True,
                                                       messages=[{"role": "user", "content": QUESTION}]):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    assert finish == res.choices[0].finish_reason and usage.completion_tokens == res.usage.completion_tokens
    assert_server_saw_only_obfuscated_ids(stack["recorder"].bodies[since:], stack["client"], [QUESTION],
                                          [stack["client"].chat_ids(QUESTION)])
    last = httpx.get(stack["proxy"] + "/aloe/last-exchange").json()["exchange"]
    assert last["server_prompt_ids"] == stack["client"].map.to_server(stack["client"].chat_ids(QUESTION))
    assert "is Paris" not in last["server_output_text"] and len(last["server_output_ids"]) == usage.completion_tokens
    # the answer's plain ids, mapped back by the client, read "Paris"; the server's ids keep at most one of them in
    # place (a random permutation of ~49k ids keeps a content token with chance ~1/49k)
    plain_out = stack["client"].map.from_server(last["server_output_ids"])
    assert "Paris" in stack["client"].tokenizer.decode(plain_out)
    special = set(stack["client"].tokenizer.all_special_ids)
    assert sum(s == p and p not in special for s, p in zip(last["server_output_ids"], plain_out)) <= 1


def test_text_completion_and_stop_string_cut_on_the_plain_side(stack, openai_client):
    prompt = "The capital of France is"
    full = openai_client.completions.create(model="any", prompt=prompt, max_tokens=8, temperature=0)
    text = full.choices[0].text
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]  # a plain word the untrusted server never sees as text
    cut = openai_client.completions.create(model="any", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(
        model="any", prompt=prompt, max_tokens=8, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_stop_cutter_and_incremental_decoder():
    cutter = StopCutter(["END", "\n\n"])
    out = [cutter.push(p) for p in ["ab", "cE", "N", "xyz E", "ND more"]]
    assert "".join(out) == "abcENxyz " and out[1] == "c" and cutter.stopped
    decoder = IncrementalDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    euro = list("€".encode())
    assert [decoder.push(b) for b in [104, *euro]] == ["h", "", "", "€"] and decoder.flush() == ""



def test_incremental_decoder_on_the_real_tokenizer_is_whole_text_and_linear(smollm2_path):
    """On SmolLM2's byte-level tokenizer, text that splits characters over several tokens (accents, CJK, emoji):
    the pieces join to the whole decode, none holds a split character, every offset is where its token's text
    begins (the decode of the tokens before it, wherever that is whole), and the ids decoded in all grow linearly
    with the answer, not quadratically."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = "Caf\u00e9 cr\u00e8me \u2014 \u6771\u4eac\u306e\u5929\u6c17 \U0001f600\U0001f680! na\u00efve " * 12
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = [0]

    def decode(window):
        decoded[0] += len(window)
        return tok.decode(window)

    decoder = IncrementalDecoder(decode)
    pieces = [decoder.push(i) for i in ids]
    tail = decoder.flush()
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) and sum(p == "" for p in pieces) > 10   # some were held
    for n, offset in enumerate(decoder.offsets):
        prefix = tok.decode(ids[:n])
        if "\ufffd" not in prefix:
            assert offset == len(prefix)
    assert decoder.offsets == sorted(decoder.offsets) and len(ids) > 300
    assert decoded[0] <= 12 * len(ids)   # the whole-prefix way decodes len(ids)^2 / 2 ids (> 45,000 here)

@pytest.mark.parametrize("body,reason", [
    (b"{not json", "JSON"),
    (b'{"model": "x"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": "hello"}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', "refused"),
    (b'[1, 2]', "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "min_p": 1.5}', "min_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}', "presence_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -3}', "frequency_penalty"),
])
def test_malformed_requests_get_a_one_line_4xx(stack, body, reason):
    r = httpx.post(stack["proxy"] + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert 400 <= r.status_code < 500, r.text
    message = r.json()["error"]["message"]
    assert reason.lower() in message.lower() and "\n" not in message and "Traceback" not in r.text


def test_requests_addressed_to_another_host_are_refused(stack):
    r = httpx.get(stack["proxy"] + "/v1/models", headers={"host": "attacker.example:8100"})
    assert r.status_code == 403 and "127.0.0.1" in r.json()["error"]["message"]
    assert httpx.get(stack["proxy"] + "/v1/models", headers={"host": "localhost:8100"}).status_code == 200


def test_a_form_body_is_refused_with_a_reason(stack):
    r = httpx.post(stack["proxy"] + "/v1/chat/completions", content=b"{bad",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_malformed_text_completion_requests(stack):
    for body in ({"prompt": ["a", "b"]}, {"prompt": [1, 10**9]}, {"prompt": ""}, {"prompt": 3}):
        r = httpx.post(stack["proxy"] + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]


def test_slow_server_gives_504_and_a_dead_one_502(smollm2_exact, smollm2_path):
    _, secret_path = smollm2_exact
    fingerprint = load_secret(secret_path).fingerprint
    fake = FastAPI()

    @fake.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "slow", "aloe": {"secret_fingerprint": fingerprint}}]}

    @fake.post("/v1/completions")
    async def slow():
        await asyncio.sleep(2.0)
        return {}

    with app_thread(fake, health="/v1/models") as fake_url:
        proxy_app = create_proxy_app(connect(fake_url, secret_path, smollm2_path, timeout=0.5))
        with app_thread(proxy_app, health="/v1/models") as proxy_url:
            for stream in (False, True):
                r = httpx.post(proxy_url + "/v1/chat/completions", timeout=30,
                               json={"messages": [{"role": "user", "content": "hi"}], "stream": stream})
                assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    with app_thread(proxy_app, health="/v1/models") as proxy_url:  # the fake server is gone now
        r = httpx.post(proxy_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       timeout=30)
        assert r.status_code == 502 and "cannot reach" in r.json()["error"]["message"], r.text
        assert httpx.get(proxy_url + "/v1/models").status_code == 200
        assert httpx.get(proxy_url + "/").status_code == 200


def test_top_p_and_seed_reach_the_server(stack, openai_client):
    since = len(stack["recorder"].bodies)
    ask = {"model": "any", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 1.0,
           "top_p": 0.9, "seed": 1234}
    whole = openai_client.chat.completions.create(**ask).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        **ask, stream=True) if c.choices)
    client = stack["client"]
    sent = assert_server_saw_only_obfuscated_ids(stack["recorder"].bodies[since:], client, [QUESTION],
                                                 [client.chat_ids(QUESTION)])
    assert len(sent) == 2
    for body in sent:
        assert (body["top_p"], body["seed"], body["temperature"], body["max_tokens"]) == (0.9, 1234, 1.0, 6), body
    assert whole == streamed  # the same seed samples the same answer


def test_min_p_and_the_openai_penalties_reach_the_server(stack, openai_client):
    """min-p 1 keeps only the likeliest token, so a sampled answer is the greedy one under the same penalties: the
    settings reach the server unchanged (they act on ids alone, so they commute with the permutation)."""
    since = len(stack["recorder"].bodies)
    ask = {"model": "any", "messages": [{"role": "user", "content": "Write the word cat five times."}],
           "max_tokens": 8, "presence_penalty": 0.5, "frequency_penalty": 1.5}
    sampled = openai_client.chat.completions.create(**ask, temperature=1.0, seed=99, extra_body={"min_p": 1.0})
    greedy = openai_client.chat.completions.create(**ask, temperature=0.0)
    plain = openai_client.chat.completions.create(model="any", messages=ask["messages"], max_tokens=8,
                                                  temperature=0.0)
    sent = stack["recorder"].bodies[since:]
    assert len(sent) == 3
    sent = [json.loads(b) for b in sent]
    assert [(b["min_p"], b["presence_penalty"], b["frequency_penalty"]) for b in sent] == [
        (1.0, 0.5, 1.5), (0.0, 0.5, 1.5), (0.0, 0.0, 0.0)]
    assert sampled.choices[0].message.content == greedy.choices[0].message.content
    assert greedy.choices[0].message.content != plain.choices[0].message.content, plain   # the penalties act


def test_logprobs_are_the_plain_models_through_the_proxy(stack, openai_client, smollm2_path):
    """Chat ``logprobs``/``top_logprobs`` and legacy ``logprobs`` through the stock ``openai`` package: each answer
    token's log-probability and the likeliest ones, computed by the server over obfuscated ids and mapped back by the
    proxy, are the plain model's (exact profile, float32 on both sides), streamed or not, with the tokens' text and
    bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    ask = {"model": "any", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
    res = openai_client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    answer, content = res.choices[0].message.content, res.choices[0].logprobs.content
    # every generated token is listed, the end-of-turn token included (counted in usage, not shown in the text)
    assert len(content) == res.usage.completion_tokens and "".join(c.token for c in content) == answer + "<|im_end|>"
    client = stack["client"]
    prompt = client.chat_ids(QUESTION)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = client.complete(QUESTION, max_tokens=8).token_ids
    with torch.no_grad():
        rows = torch.log_softmax(plain(torch.tensor([prompt + ids])).logits[0].double(), -1)[len(prompt) - 1:]
    for n, c in enumerate(content):
        assert abs(c.logprob - float(rows[n, ids[n]])) < 2e-3 and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token   # greedy: the likeliest
        want = rows[n].topk(3)
        assert [client.tokenizer.decode([int(i)]) for i in want.indices] == [t.token for t in c.top_logprobs]
        assert all(abs(t.logprob - float(v)) < 2e-3 for t, v in zip(c.top_logprobs, want.values, strict=True))
    streamed = []
    for chunk in openai_client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert openai_client.chat.completions.create(**ask).choices[0].logprobs is None
    text = openai_client.completions.create(model="any", prompt="The capital of France is", max_tokens=4,
                                            temperature=0, logprobs=2).choices[0]
    lp = text.logprobs
    assert "".join(lp.tokens) == text.text and len(lp.token_logprobs) == 4
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(own) for own, top in
               zip(lp.token_logprobs, lp.top_logprobs, strict=True))   # greedy: its own is the top one
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:n]) for n in range(4)]
    for body, reason in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                 "top_logprobs")):
        r = httpx.post(stack["proxy"] + "/v1/chat/completions", json={**ask, **body}, timeout=60)
        assert r.status_code in (400, 422) and reason in r.json()["error"]["message"], r.text
    r = httpx.post(stack["proxy"] + "/v1/completions", json={"prompt": "Hi", "logprobs": 30}, timeout=60)
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]


def test_token_texts_give_each_tokens_exact_bytes(smollm2_path):
    """A byte-level BPE token that holds part of a UTF-8 character has bytes that are not its text's."""
    from transformers import AutoTokenizer

    from aloe.serving.proxy import TokenTexts

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    texts = TokenTexts(tok)
    ids = tok("é café", add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(texts(i)[1]) for i in ids) == "é café".encode()
    assert texts(142)[1] == [0xC3] and texts(2) == ("<|im_end|>", list(b"<|im_end|>"))


def test_aloe_complete_passes_every_sampling_setting(stack, smollm2_exact, smollm2_path, capsys):
    """`aloe complete` sends its sampling flags to the server as the client's own settings: min-p 1 leaves the
    greedy pick under the same penalties, which the library call gives too."""
    since = len(stack["recorder"].bodies)
    question = "Write the word cat five times."
    assert aloe_main(["complete", "--server", stack["server"], "--secret", str(smollm2_exact[1]), "--tokenizer",
                      str(smollm2_path), "--max-tokens", "8", "--temperature", "1", "--top-p", "0.9", "--top-k", "20",
                      "--min-p", "1", "--repetition-penalty", "1.1", "--presence-penalty", "0.5",
                      "--frequency-penalty", "1.5", "--seed", "3", "--logprobs", "2", "--json", question]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["logprobs"]) == len(out["token_ids"])
    assert all(len(e["top"]) <= 3 and e["top"][0][1] >= e["logprob"] for e in out["logprobs"])
    body = json.loads(stack["recorder"].bodies[since])
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                                 "frequency_penalty", "seed", "max_tokens", "logprobs")} == dict(
        temperature=1.0, top_p=0.9, top_k=20, min_p=1.0, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=1.5, seed=3, max_tokens=8, logprobs=2)
    greedy = stack["client"].complete([{"role": "user", "content": question}], max_tokens=8, temperature=0.0,
                                      repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=1.5)
    assert out["token_ids"] == greedy.token_ids and out["text"] == greedy.text


@contextlib.contextmanager
def _serve_on(app, port: int):
    """``app`` on a given loopback port (uvicorn in a thread), so that it can come back at the same address."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60.0, path="/v1/models")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_the_proxy_serves_again_once_the_server_is_back(smollm2_exact, smollm2_path):
    from transformers import AutoTokenizer

    _, secret_path = smollm2_exact
    secret, tok = load_secret(secret_path), AutoTokenizer.from_pretrained(smollm2_path)
    plain_answer = list(tok("Paris is the capital.", add_special_tokens=False)["input_ids"])
    received = []
    fake = FastAPI()  # speaks aloe serve's wire format: token-id prompts in, streamed token ids out

    @fake.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "aloe": {"secret_fingerprint": secret.fingerprint}}]}

    @fake.post("/v1/completions")
    async def completions(request: Request):
        received.append(await request.json())

        def events():
            for sid in TokenMap(secret).to_server(plain_answer):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'token_ids': [sid], 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'token_ids': [], 'finish_reason': 'stop'}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def ask(proxy_url: str, stream: bool) -> httpx.Response:
        return httpx.post(proxy_url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": QUESTION}], "stream": stream})

    def answer(r: httpx.Response, stream: bool) -> str:
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["message"]["content"]
        events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), r.text
        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])

    port = free_port()
    with _serve_on(fake, port) as fake_url:
        client = connect(fake_url, secret_path, tok, timeout=30.0)
    proxy_app = create_proxy_app(client)
    with app_thread(proxy_app, health="/v1/models") as proxy_url:
        for stream in (False, True):  # the server is gone
            r = ask(proxy_url, stream)
            assert r.status_code == 502 and "cannot reach" in r.json()["error"]["message"], r.text
        with _serve_on(fake, port):  # back at the same address: the same proxy answers again
            for stream in (False, True):
                assert answer(ask(proxy_url, stream), stream) == "Paris is the capital."
    assert len(received) == 2
    assert [body["prompt"] for body in received] == [client.map.to_server(client.chat_ids(QUESTION))] * 2


def test_wrong_secret_is_refused_at_start(stack, smollm2_exact, smollm2_path, tmp_path, capsys, monkeypatch):
    import uvicorn

    good = load_secret(smollm2_exact[1])
    tau = np.array(good.tau, copy=True)
    tau[[10, 11]] = tau[[11, 10]]
    save_secret(tmp_path / "other.json", Secret(good.seed, tau))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the proxy started with a wrong secret"))
    rc = aloe_main(["proxy", "--server", stack["server"], "--secret", str(tmp_path / "other.json"),
                    "--tokenizer", str(smollm2_path), "--port", str(free_port())])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "fingerprint mismatch" in err and len(err.splitlines()) == 1
    rc = aloe_main(["proxy", "--server", stack["server"], "--secret", str(smollm2_exact[1]), "--tokenizer",
                    str(smollm2_path), "--host", "0.0.0.0"])
    assert rc == 2 and "loopback" in capsys.readouterr().err


def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="chromium and chromedriver not found (apt-get install -y chromium "
                                                "chromium-driver; `make setup` does this as root)")
def test_chat_page_in_a_headless_browser(stack, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    client = stack["client"]
    wait = WebDriverWait(driver, 180)
    try:
        driver.get(stack["proxy"] + "/")
        # the header says how much of what the server sees the strongest measured attack read on its profile
        info = httpx.get(stack["proxy"] + "/aloe/info").json()
        shipped = json.loads(TABLE.read_text())["profiles"]["exact"]["recovery"]
        assert (info["privacy"]["profile"], info["privacy"]["attack"], info["privacy"]["recovery"]) == (
            "exact", *max(shipped.items(), key=lambda kv: kv[1]))
        wait.until(lambda d: info["privacy"]["text"] in d.find_element(By.ID, "privacy").text)
        assert "reads 100.0% of the vocabulary" in driver.find_element(By.ID, "privacy").text
        assert stack["server"] in driver.find_element(By.TAG_NAME, "header").text
        # every change of the latest answer's text, as the page shows it while the answer streams in
        driver.execute_script("""
            window.answerLengths = [];
            const history = document.getElementById("history");
            new MutationObserver(() => {
              const answers = history.querySelectorAll(".msg.assistant .body");
              if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
            }).observe(history, {childList: true, subtree: true, characterData: true});""")
        box = driver.find_element(By.ID, "question")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("16")
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done, .msg.error"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(By.ID, "history").text
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .body").get_attribute("textContent")
        assert "Paris" in answer
        lengths = driver.execute_script("return window.answerLengths;")
        assert lengths == sorted(lengths) and lengths[-1] == len(answer), lengths
        assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, f"the answer did not stream in: {lengths}"
        wait.until(lambda d: d.find_element(By.ID, "server-output-ids").text.startswith("["))
        ids = json.loads(driver.find_element(By.ID, "server-prompt-ids").text)
        assert ids == client.map.to_server(client.chat_ids(QUESTION))
        assert driver.find_element(By.ID, "server-prompt-text").text
        assert "capital of France" not in driver.find_element(By.ID, "server-pane").text
        # a second question, with every sampling setting of the page: the conversation stays on the page and goes
        # to the server as history, and the settings reach the server as they were typed
        driver.find_element(By.CSS_SELECTOR, "#sampling summary").click()
        settings = {"top-p": "0.9", "top-k": "5", "min-p": "0.1", "repetition-penalty": "1.1",
                    "presence-penalty": "0.5", "frequency-penalty": "0.5", "seed": "7"}
        for field, value in settings.items():
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        since = len(stack["recorder"].bodies)
        second = "And what is the capital of Italy?"
        box.send_keys(second)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done, .msg.error")) == 2)
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(By.ID, "history").text
        sent = [json.loads(b) for b in stack["recorder"].bodies[since:] if b]
        assert len(sent) == 1
        assert {k: sent[0][k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                        "presence_penalty", "frequency_penalty", "seed")} == dict(
            temperature=0.0, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1, presence_penalty=0.5,
            frequency_penalty=0.5, seed=7)
        conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer},
                        {"role": "user", "content": second}]
        sent = json.dumps(client.map.to_server(client.chat_ids(conversation)), separators=(",", ":"))
        wait.until(lambda d: d.find_element(By.ID, "server-prompt-ids").get_attribute("textContent") == sent)

        def shown(role):
            found = driver.find_elements(By.CSS_SELECTOR, f".msg.{role}")
            assert all(m.is_displayed() for m in found)
            return [m.find_element(By.CSS_SELECTOR, ".body").get_attribute("textContent") for m in found]

        assert shown("user") == [QUESTION, second]
        answers = shown("assistant")
        assert len(answers) == 2 and answers[0] == answer and answers[1].strip(), answers
        shot = Path(os.environ.get("ALOE_PROXY_SCREENSHOT") or tmp_path / "proxy-page.png")
        part = shot.with_name(shot.name + ".part")
        part.write_bytes(driver.get_screenshot_as_png())
        os.replace(part, shot)
        # an error is shown to the person: a request the server refuses; the conversation stays
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("100")  # over the server's limit of 64
        box.send_keys("Again?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "refused" in driver.find_element(By.CSS_SELECTOR, ".msg.error").text
        assert shown("user") == [QUESTION, second, "Again?"] and shown("assistant") == answers
        # a setting the proxy refuses: its one-line reason is shown and nothing reaches the server
        since = len(stack["recorder"].bodies)
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("64")
        driver.find_element(By.ID, "top-p").clear()
        driver.find_element(By.ID, "top-p").send_keys("0")
        box.send_keys("Once more?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.error")) == 2)
        assert "top_p" in driver.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        assert len(stack["recorder"].bodies) == since and shown("assistant") == answers
        driver.find_element(By.ID, "top-p").clear()
        driver.find_element(By.ID, "top-p").send_keys("1")
        # Stop, as soon as the answer starts to stream in: the part received stays in the conversation, the proxy
        # closes the server's stream (and records the exchange as cancelled), and the chat goes on
        box.send_keys("Tell me a long story about a brave little cat.")
        box.send_keys(Keys.ENTER)
        streaming = ".msg.assistant.streaming .body"
        WebDriverWait(driver, 180, poll_frequency=0.02).until(
            lambda d: any(e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, streaming)))
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda d: "stopped by you" in d.find_element(By.ID, "server-output-count").text)
        partial = driver.find_element(By.CSS_SELECTOR, ".msg.assistant.stopped .body").get_attribute("textContent")
        last = httpx.get(stack["proxy"] + "/aloe/last-exchange").json()["exchange"]
        assert last["finish_reason"] == "cancelled" and 0 < len(last["server_output_ids"]) < 64, last
        assert partial and driver.find_element(By.ID, "stop").get_attribute("disabled")
        driver.find_element(By.ID, "system").send_keys("You answer in one sentence.")   # sent first from now on
        box.send_keys("Thanks.")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 4)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.error")) == 2
        conversation += [{"role": "assistant", "content": answers[1]},
                         {"role": "user", "content": "Tell me a long story about a brave little cat."},
                         {"role": "assistant", "content": partial}, {"role": "user", "content": "Thanks."}]
        system = [{"role": "system", "content": "You answer in one sentence."}]
        sent = json.dumps(client.map.to_server(client.chat_ids(system + conversation)), separators=(",", ":"))
        wait.until(lambda d: d.find_element(By.ID, "server-prompt-ids").get_attribute("textContent") == sent)
        # under every finished answer, its token count and timing (the stopped one has no count from the server)
        stats = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg .stats")]
        assert len(stats) == 3 and all(re.fullmatch(r"\d+ tokens?: the first after \d+\.\d\d s"
                                                    r"(, then \d+\.\d tokens/s)?", x) for x in stats), stats
        # a reload keeps the conversation (failed turns and errors aside) and the settings, and goes on from them
        thanks = shown("assistant")[-1]
        driver.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 4)
        assert shown("user") == [QUESTION, second, "Tell me a long story about a brave little cat.", "Thanks."]
        assert shown("assistant") == [answer, answers[1], partial, thanks]
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert driver.find_element(By.ID, "system").get_attribute("value") == "You answer in one sentence."
        assert driver.find_element(By.ID, "top-k").get_attribute("value") == "5"
        box = driver.find_element(By.ID, "question")
        box.send_keys("Bye.")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 5)
        conversation += [{"role": "assistant", "content": thanks}, {"role": "user", "content": "Bye."}]
        sent = json.dumps(client.map.to_server(client.chat_ids(system + conversation)), separators=(",", ":"))
        wait.until(lambda d: d.find_element(By.ID, "server-prompt-ids").get_attribute("textContent") == sent)
        n_sent = len(json.loads(driver.find_element(By.ID, "server-output-ids").get_attribute("textContent")))
        last = driver.find_elements(By.CSS_SELECTOR, ".msg .stats")[-1].get_attribute("textContent")
        assert last.startswith(f"{n_sent} token"), (last, n_sent)     # the count is the server's own
        # New chat forgets the conversation, across a reload too; the settings stay
        driver.find_element(By.ID, "clear").click()
        driver.refresh()
        wait.until(lambda d: d.find_element(By.ID, "system").get_attribute("value") == "You answer in one sentence.")
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
    finally:
        driver.quit()


def test_privacy_statement_says_only_what_was_measured():
    """The page's line on how much the server reads: the strongest measured attack of the profile the server
    names, and otherwise that it is not stated or not measured (never a figure that was not measured)."""
    from types import SimpleNamespace

    from aloe.serving.proxy import privacy_statement

    measured = {"status": "measured", "measured_as": "private", "measured_on": "SmolLM2-135M-Instruct",
                "recovery": {"vma": 0.2, "weight-key": 0.9999, "ia": 0.18}}
    said = {"profile": {"name": "private"}, "measured_risk": measured}
    s = privacy_statement(SimpleNamespace(backend="openai", artifact=said))
    assert (s["attack"], s["recovery"], s["sees"]) == ("weight-key", 0.9999, "obfuscated token ids")
    assert "strongest attack of the suite (weight-key) reads 100.0% of the vocabulary" in s["text"]
    other = {"profile": {"name": "private"}, "measured_risk": {"status": "not measured", "measured_on": "SmolLM2"}}
    s = privacy_statement(SimpleNamespace(backend="openai", artifact=other))
    assert s["recovery"] is None and "not measured for this model" in s["text"] and "SmolLM2" in s["text"]
    s = privacy_statement(SimpleNamespace(backend="llama.cpp", artifact={}))
    assert s["recovery"] is None and "does not say which profile" in s["text"] and "llama.cpp" in s["text"]
    s = privacy_statement(SimpleNamespace(backend="embeds", artifact=said))
    assert s["recovery"] is None and "input vectors" in s["sees"] and "does not state it" in s["text"]

"""What the untrusted server receives, recorded in the tests: an ASGI wrapper keeping every request body, a loopback
relay that passes requests on to a server in another process (llama-server), and the check that the recorded
bodies hold only obfuscated token-id prompts."""

from __future__ import annotations

import json

import httpx

_HOP = {b"host", b"content-length", b"transfer-encoding", b"connection"}


class Recorder:
    """ASGI wrapper around the untrusted server keeping every request body it received."""

    def __init__(self, app) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        parts = []

        async def recording():
            msg = await receive()
            if msg["type"] == "http.request":
                parts.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    self.bodies.append(b"".join(parts))
            return msg

        return await self.app(scope, recording, send)


def forwarder(upstream: str):
    """An ASGI app passing every HTTP request on to ``upstream`` unchanged and streaming its answer back as it
    comes (wrap it in :class:`Recorder` for a recording relay)."""
    upstream = upstream.rstrip("/")

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        query = scope.get("query_string") or b""
        url = upstream + scope["path"] + ("?" + query.decode() if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        async with httpx.AsyncClient(timeout=None) as http, \
                http.stream(scope["method"], url, content=body, headers=headers) as resp:
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP]})
            async for part in resp.aiter_raw():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def is_subsequence(needle: list[int], hay: list[int]) -> bool:
    it = iter(hay)
    return all(any(x == y for y in it) for x in needle)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def assert_server_saw_only_obfuscated_ids(bodies: list[bytes], client, questions: list[str],
                                          plain_prompts: list[list[int]]) -> list[dict]:
    """Every completion request among ``bodies`` (what the untrusted server received) has a token-id prompt equal
    to one of ``plain_prompts`` mapped with the client's tau (and unequal to the plain ids), and no request holds a
    plain word of ``questions`` anywhere, as text or as the question's plain ids, and the plain tokenizer reads no
    two consecutive words of a question in the ids it handles. Returns those requests."""
    words = {w.strip("?.,!").lower() for q in questions for w in q.split() if len(w.strip("?.,!")) >= 5}
    assert words, "no plain word to look for"
    pairs = {f"{a} {b}" for q in questions for a, b in zip(q.lower().split(), q.lower().split()[1:])}
    mapped = [client.map.to_server(p) for p in plain_prompts]
    requests = []
    for body in bodies:
        if not body.strip():
            continue
        request = json.loads(body)
        assert isinstance(request, dict), body[:200]
        lowered = body.lower()
        assert not [w for w in words if w.encode() in lowered], body[:300]
        assert not [s for s in _strings(request) if any(q in s for q in questions)]
        if "prompt" not in request:
            continue
        prompt = request["prompt"]
        assert isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt), \
            f"the server received a prompt that is not token ids: {str(prompt)[:200]}"
        assert prompt in mapped, "the server received a prompt that is not a tau-mapped plain prompt"
        assert prompt not in plain_prompts, "the server received plain ids"
        for q in questions:
            assert not is_subsequence(list(client.tokenizer(q, add_special_tokens=False)["input_ids"]), prompt)
        # what the server reads with the plain tokenizer: a random permutation of ~49k ids leaves a content token
        # where it was with chance ~1/49k, and a single word of the question may turn up by chance among the
        # random tokens it reads, but no two consecutive words of a question do
        plain = plain_prompts[mapped.index(prompt)]
        special = set(client.tokenizer.all_special_ids)
        kept = [i for i, (s, p) in enumerate(zip(prompt, plain)) if s == p and p not in special]
        assert len(kept) <= 1, f"the server reads {len(kept)} content tokens of the prompt as they are"
        seen = " ".join(client.server_view(prompt).lower().split())
        assert not [pair for pair in pairs if pair in seen], "the server reads two consecutive words of a question"
        requests.append(request)
    assert requests, "the server received no completion request"
    return requests

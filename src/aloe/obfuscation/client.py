"""The AloePri client: the only party that holds the secret.

It tokenizes locally (with the plain tokenizer and chat template), maps prompt ids with tau, sends token ids — never
detokenized obfuscated text, since BPE does not round-trip — maps the returned ids back with tau^-1 and detokenizes.
Special tokens (BOS/EOS/chat-template tokens) are fixed points of tau, so the server's EOS stop keeps working.

Sampling parameters that commute with a permutation of the vocabulary pass through unchanged (temperature, top-k,
top-p, repetition penalty, seed); ``logit_bias`` is translated (its keys are ids); stop *strings*, grammars and JSON
schemas act on the server's text, which is gibberish under obfuscation, so they are refused — pass stop token ids.

Three wire formats: ``openai`` (``/v1/completions`` with a token-id prompt, as vLLM and ``aloe serve`` accept; ids
come back in ``choices[0].token_ids``), ``llama.cpp`` (llama-server's native ``/completion`` with
``return_tokens``), and ``embeds``, the client-held vocabulary mode (:mod:`aloe.obfuscation.client_vocab`): the
client keeps both vocabulary tables, sends input vectors to ``aloe serve``'s ``/v1/aloe/embeds`` one step at a
time, applies the head to the hidden state that comes back and samples locally; the server then sees no token id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from aloe import AloeError
from aloe.obfuscation.secret import Secret, load_secret

BACKENDS = ("openai", "llama.cpp", "embeds")
REFUSED = {
    "stop": "stop strings act on the server's text, which is gibberish under obfuscation; pass stop_token_ids",
    "grammar": "grammars constrain the server's text, which is permuted; not supported",
    "json_schema": "JSON schemas constrain the server's text, which is permuted; not supported",
    "response_format": "response formats constrain the server's text, which is permuted; not supported",
    "guided_json": "guided decoding constrains the server's text, which is permuted; not supported",
    "guided_regex": "guided decoding constrains the server's text, which is permuted; not supported",
}


class TokenMap:
    """tau and its inverse as fast lookups."""

    def __init__(self, secret: Secret) -> None:
        self.tau = np.asarray(secret.tau, dtype=np.int64)
        self.inv = np.asarray(secret.tau_inverse, dtype=np.int64)

    def _check(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.tau)):
            raise AloeError(f"token id outside the vocabulary 0..{len(self.tau) - 1}")
        return arr

    def to_server(self, ids) -> list[int]:
        return self.tau[self._check(ids)].tolist()

    def from_server(self, ids) -> list[int]:
        return self.inv[self._check(ids)].tolist()


@dataclass
class Completion:
    text: str
    token_ids: list[int]                 # plain ids of the answer
    finish_reason: str | None
    server_prompt_ids: list[int]         # what the server received
    server_output_ids: list[int]         # what the server sent
    timings: dict = field(default_factory=dict)
    logprobs: list[tuple[float, dict[int, float]]] | None = None   # per answer token: its own, the top ones (plain ids)


class ServerError(AloeError):
    """The untrusted server could not be reached (``kind`` "unreachable"), was too slow ("timeout"), or answered
    with an error (``kind`` "status", its HTTP code in ``status``), or streamed fewer token ids than it generated
    ("incomplete")."""

    def __init__(self, message: str, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


def server_error(exc: httpx.HTTPError, server: str) -> ServerError:
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"the server at {server} did not answer in time ({type(exc).__name__})", "timeout")
    return ServerError(f"cannot reach the server at {server}: {exc}", "unreachable")


def check_stream_count(received: int, predicted) -> None:
    """llama-server counts the tokens it generated in every stream chunk (``tokens_predicted``). It holds back from its
    stream a token whose own text leaves an incomplete UTF-8 sequence and never sends that token's id: with an
    obfuscated model the server-side text of an id means nothing, so a GGUF whose such tokens are not marked (not
    exported by aloe, or by an older aloe) loses generated tokens silently. Refuse the answer instead."""
    if isinstance(predicted, int) and predicted > received:
        raise ServerError(f"llama-server generated {predicted} tokens but streamed the ids of {received}: it holds "
                          "back tokens whose text is incomplete UTF-8, so serve a GGUF that aloe exported (it marks "
                          "them) or ask without streaming", "incomplete")


class IncrementalDecoder:
    """Plain ids in, new text out: a piece is released only once it no longer ends inside a UTF-8 character.

    Each push decodes a short window only (the ids from the one before the last released piece on), not the whole
    answer, so an answer of n tokens costs O(n) decoding, not O(n^2): the text a new id adds is the window's text
    with it less the window's text without it (the id before the last piece stays in the window, so that a
    tokenizer that drops a leading word-boundary space on the first id of what it decodes drops it there, as in the
    whole answer). ``offsets`` holds, for every pushed id, how many characters were released before it: where its
    text begins in the answer (vLLM's and OpenAI's ``text_offset``).
    """

    def __init__(self, decode) -> None:
        self.decode, self.ids, self.offsets = decode, [], []
        self.prefix = self.read = 0   # the window: ids[prefix:read] were released already, ids[read:] are held
        self.released = 0             # characters released so far

    def _pending(self) -> str:
        done = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.decode(self.ids[self.prefix:])
        return text[len(done):] if len(text) > len(done) else ""

    def _release(self, piece: str) -> str:
        self.prefix, self.read = self.read, len(self.ids)
        self.released += len(piece)
        return piece

    def push(self, token_id: int) -> str:
        self.offsets.append(self.released)
        self.ids.append(int(token_id))
        piece = self._pending()
        return self._release(piece) if piece and not piece.endswith("\ufffd") else ""

    def flush(self) -> str:
        piece = self._pending()
        return self._release(piece) if piece else ""


class TokenStream:
    """One streamed request. Iterating sends it and yields the answer's plain ids; afterwards ``finish_reason``,
    ``token_ids`` (plain) and ``server_output_ids`` (what the server sent) are set. ``server_prompt_ids`` is what
    the server receives."""

    def __init__(self, client: PrivateClient, prompt_ids: list[int], server_prompt_ids: list[int], body: dict,
                 stops: set[int], logprobs: int | None = None) -> None:
        self.client, self.prompt_ids, self.server_prompt_ids = client, prompt_ids, server_prompt_ids
        self.body, self.stops = body, stops
        self.token_ids: list[int] = []
        self.server_output_ids: list[int] = []
        self.server_vectors = 0              # embeds mode: input vectors the server received (it sees no id)
        self.finish_reason: str | None = None
        self.k = logprobs
        self.logprobs: list[tuple[float, dict[int, float]]] | None = [] if logprobs is not None else None
        if client.backend == "embeds":
            self.server_prompt_ids = []

    def __iter__(self) -> Iterator[int]:
        events = self.client._stream_server_ids(self.body, self.stops, self.k)
        try:  # leaving early (a consumer's stop string, a closed connection) closes the server's stream too
            for sid, finish, lp in events:
                if finish is not None:
                    self.finish_reason = finish
                    return
                pid = self.client.map.from_server([sid])[0]
                if self.logprobs is not None:
                    self.logprobs.append(self.client.plain_logprob(lp, sid))
                if self.client.backend == "embeds":
                    self.server_vectors = len(self.prompt_ids) + len(self.token_ids)
                else:
                    self.server_output_ids.append(sid)
                self.token_ids.append(pid)
                yield pid
        finally:
            events.close()


class PrivateClient:
    def __init__(self, server: str, secret: Path | Secret, tokenizer, *, backend: str = "openai",
                 model: str | None = None, timeout: float = 300.0, client_vocab: Path | None = None) -> None:
        if backend not in BACKENDS:
            raise AloeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.secret = secret if isinstance(secret, Secret) else load_secret(Path(secret))
        self.map = TokenMap(self.secret)
        self.vocab = None
        if backend == "embeds":
            from aloe.obfuscation.client_vocab import ClientVocabulary

            if client_vocab is None:
                raise AloeError("the embeds backend needs the client vocabulary file (--client-vocab)")
            self.vocab = ClientVocabulary(Path(client_vocab))
            if self.vocab.fingerprint != self.secret.fingerprint:
                raise AloeError("the client vocabulary file was not made with this secret (fingerprint mismatch)")
        if isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.server = server.rstrip("/")
        self.backend = backend
        self.model = model
        self.artifact: dict = {}  # what the server said of its artifact on verify() (aloe serve only): profile, risk
        self.http = httpx.Client(timeout=timeout)

    # -- local text handling -------------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict] | str) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def server_view(self, server_ids: list[int]) -> str:
        """What the server reads if it detokenizes the ids it handles with the plain tokenizer."""
        return self.tokenizer.decode(server_ids, skip_special_tokens=False)

    # -- server ------------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict, stream: bool = False):
        url = self.server + path
        try:
            if stream:
                return self.http.stream("POST", url, json=body)
            resp = self.http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise server_error(exc, self.server) from None
        if resp.status_code != 200:
            raise ServerError(f"server answered {resp.status_code}: {resp.text[:300]}", "status", resp.status_code)
        return resp.json()

    def verify(self) -> dict:
        """Check the server is up and, where it says which artifact it serves, that it matches our secret."""
        try:
            resp = self.http.get(self.server + ("/health" if self.backend == "llama.cpp" else "/v1/models"))
        except httpx.HTTPError as exc:
            raise server_error(exc, self.server) from None
        if resp.status_code != 200:
            raise ServerError(f"server answered {resp.status_code} on its health check", "status", resp.status_code)
        info = resp.json()
        if self.backend != "llama.cpp":
            models = info.get("data") or [{}]
            self.model = self.model or models[0].get("id")
            aloe = models[0].get("aloe") or {}
            self.artifact = aloe
            fp = aloe.get("secret_fingerprint")
            if fp is not None and fp != self.secret.fingerprint:
                raise AloeError("the server's model was not made with this secret (fingerprint mismatch)")
            if self.backend == "embeds" and not aloe.get("client_held_vocabulary"):
                raise AloeError("the embeds backend needs an aloe server with a client-held-vocabulary artifact")
            if self.backend == "embeds" and aloe.get("hidden_size") != self.vocab.hidden_size:
                raise AloeError(f"the server's hidden size {aloe.get('hidden_size')} differs from the client "
                                f"vocabulary's {self.vocab.hidden_size}")
        return info

    def _body(self, prompt_ids: list[int], max_tokens: int, sampling: dict, stop_token_ids: list[int],
              logit_bias: dict | None, stream: bool, extra: dict) -> dict:
        """The request for the backend; ``sampling``: temperature, top_p, top_k, repetition_penalty, min_p,
        presence_penalty, frequency_penalty and seed (every one commutes with the permutation)."""
        for key in extra:
            if key in REFUSED:
                raise AloeError(f"'{key}' is not supported: {REFUSED[key]}")
            raise AloeError(f"unknown sampling parameter {key!r}")
        s = dict(sampling)
        k = s.pop("logprobs", None)
        check_sampling(s)
        if k is not None and not (isinstance(k, int) and 0 <= k <= 20):
            raise AloeError(f"logprobs must be an integer in [0, 20], got {k!r}")
        bias = {self.map.tau[int(k)]: float(v) for k, v in (logit_bias or {}).items()}
        stops = self.map.to_server(stop_token_ids)
        if self.backend == "embeds":
            return dict(s, prompt=prompt_ids, max_tokens=max_tokens, logit_bias=bias, logprobs=k)
        seed = s["seed"]
        if self.backend == "openai":
            body = {"prompt": prompt_ids, "max_tokens": max_tokens, "stream": stream, "stop_token_ids": stops,
                    "return_token_ids": True, "skip_special_tokens": False,
                    **{k: v for k, v in s.items() if k != "seed"}}
            if self.model:
                body["model"] = self.model
            if seed is not None:
                body["seed"] = seed
            if bias:
                body["logit_bias"] = {str(i): v for i, v in bias.items()}
            if k is not None:   # the model's own log-probabilities, the tokens as ids (vLLM's names)
                body.update(logprobs=k, return_tokens_as_token_ids=True)
            return body
        # llama-server's names; its min_p is set always (its own default is 0.05), and its presence and frequency
        # penalties count the last repeat_last_n tokens of the context, prompt included (64 by default)
        body = {"prompt": prompt_ids, "n_predict": max_tokens, "temperature": s["temperature"], "top_p": s["top_p"],
                "top_k": max(s["top_k"], 0), "repeat_penalty": s["repetition_penalty"], "min_p": s["min_p"],
                "presence_penalty": s["presence_penalty"], "frequency_penalty": s["frequency_penalty"],
                "stream": stream, "return_tokens": True, "cache_prompt": True}
        if seed is not None:
            body["seed"] = seed
        if bias:
            body["logit_bias"] = [[int(i), v] for i, v in bias.items()]
        if k is not None:   # its n_probs 0 gives none at all; the top ones are cut to k on reading
            body.update(n_probs=max(k, 1), post_sampling_probs=False)
        return body

    def _embeds_ids(self, body: dict, stops: set[int]) -> Iterator[tuple[int, str | None, tuple | None]]:
        """The embeds mode's decode loop: one request per generated token, the KV cache kept by the server."""
        import torch

        from aloe.obfuscation.client_vocab import decode_array, encode_array

        pick = Sampler(body)
        ids, session = list(body["prompt"]), None
        x, eos = self.vocab.embed(ids), set(self.vocab.eos_ids)
        try:
            for _ in range(body["max_tokens"]):
                req = {"session": session, "embeds": encode_array(x)}
                if self.model:
                    req["model"] = self.model
                data = self._post("/v1/aloe/embeds", req)
                session = data["session"]
                hidden = torch.from_numpy(decode_array(data["hidden"], self.vocab.hidden_size).copy())
                logits = self.vocab.logits(hidden)
                nxt = pick(ids, logits)
                ids.append(nxt)
                yield nxt, None, (top_logprobs(logits, nxt, body["logprobs"]) if body.get("logprobs") is not None
                                  else None)
                if nxt in stops or nxt in eos:
                    yield -1, "stop", None
                    return
                x = self.vocab.embed([nxt])
            yield -1, "length", None
        finally:
            if session is not None:
                try:
                    self.http.delete(f"{self.server}/v1/aloe/sessions/{session}")
                except httpx.HTTPError:
                    pass  # the server drops idle sessions itself

    def _stream_server_ids(self, body: dict, stops: set[int],
                           k: int | None = None) -> Iterator[tuple[int, str | None, tuple | None]]:
        """(server id, None, its log-probabilities or None) for each answer token, then (-1, finish reason, None)."""
        if self.backend == "embeds":
            yield from self._embeds_ids(body, stops)
            return
        path = "/v1/completions" if self.backend == "openai" else "/completion"
        try:
            with self._post(path, body, stream=True) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise ServerError(f"server answered {resp.status_code}: {resp.text[:300]}", "status",
                                      resp.status_code)
                received = 0
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if self.backend == "openai":
                        choice = chunk["choices"][0]
                        ids, finish = choice.get("token_ids") or [], choice.get("finish_reason")
                    else:
                        ids, finish = chunk.get("tokens") or [], ("stop" if chunk.get("stop") else None)
                        received += len(ids)
                        check_stream_count(received, chunk.get("tokens_predicted"))
                    lps = server_logprobs(self.backend, choice if self.backend == "openai" else chunk, ids, k)
                    for i, lp in zip(ids, lps, strict=True):
                        yield int(i), None, lp
                        if int(i) in stops:
                            yield -1, "stop", None
                            return
                    if finish:
                        yield -1, finish, None
                        return
        except httpx.HTTPError as exc:
            raise server_error(exc, self.server) from None

    def open_stream(self, prompt: list[dict] | str | list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = -1, repetition_penalty: float = 1.0, min_p: float = 0.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                    stop_token_ids: list[int] = (), logit_bias: dict | None = None, logprobs: int | None = None,
                    **extra) -> TokenStream:
        """A streamed request, not yet sent: iterate it for the answer's plain ids as the server sends them.
        ``logprobs`` k (0-20): each answer token's log-probability under the model and the k likeliest (in
        ``stream.logprobs``, plain ids)."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        min_p=min_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        seed=seed, logprobs=logprobs)
        plain = list(prompt) if _is_ids(prompt) else self.chat_ids(prompt)
        server_prompt = self.map.to_server(plain)
        body = self._body(server_prompt, max_tokens, sampling, list(stop_token_ids), logit_bias, True, extra)
        return TokenStream(self, plain, server_prompt, body, set(self.map.to_server(stop_token_ids)), logprobs)

    def stream(self, prompt: list[dict] | str | list[int], **params) -> Iterator[str]:
        """Yield the answer's text incrementally (decoded from the plain ids so far); ``params`` as for complete."""
        decoder = IncrementalDecoder(self.detokenize)
        for pid in self.open_stream(prompt, **params):
            if piece := decoder.push(pid):
                yield piece
        if tail := decoder.flush():
            yield tail

    def complete(self, prompt: list[dict] | str | list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = -1, repetition_penalty: float = 1.0, min_p: float = 0.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                 stop_token_ids: list[int] = (), logit_bias: dict | None = None, logprobs: int | None = None,
                 **extra) -> Completion:
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                        min_p=min_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        seed=seed, logprobs=logprobs)
        if self.backend == "embeds":
            stream = self.open_stream(prompt, max_tokens=max_tokens, stop_token_ids=stop_token_ids,
                                      logit_bias=logit_bias, **sampling, **extra)
            t0 = time.perf_counter()
            out = [i for i in stream if i not in set(stop_token_ids)]
            return Completion(self.detokenize(out), out, stream.finish_reason, [], [],
                              {"server_vectors": stream.server_vectors, "seconds": time.perf_counter() - t0},
                              stream.logprobs[:len(out)] if stream.logprobs is not None else None)
        plain = list(prompt) if _is_ids(prompt) else self.chat_ids(prompt)
        t0 = time.perf_counter()
        server_prompt = self.map.to_server(plain)
        t_map = time.perf_counter() - t0
        body = self._body(server_prompt, max_tokens, sampling, list(stop_token_ids), logit_bias, False, extra)
        t1 = time.perf_counter()
        data = self._post("/v1/completions" if self.backend == "openai" else "/completion", body)
        t_server = time.perf_counter() - t1
        if self.backend == "openai":
            choice = data["choices"][0]
            out_ids, finish = choice.get("token_ids"), choice.get("finish_reason")
            if out_ids is None:
                raise AloeError("the server returned no token ids (an OpenAI server must support return_token_ids)")
        else:
            out_ids = data.get("tokens")
            finish = data.get("stop_type") or ("stop" if data.get("stopped_eos") else "length")
            if out_ids is None:
                raise AloeError("llama-server returned no token ids (needs return_tokens support)")
        out_ids = [int(i) for i in out_ids]
        lps = server_logprobs(self.backend, choice if self.backend == "openai" else data, out_ids, logprobs)
        stops = set(self.map.to_server(stop_token_ids))
        for k, i in enumerate(out_ids):
            if i in stops:
                out_ids, finish = out_ids[:k], "stop"
                break
        t2 = time.perf_counter()
        plain_out = self.map.from_server(out_ids)
        t_unmap = time.perf_counter() - t2
        text = self.detokenize(plain_out)
        plain_lps = ([self.plain_logprob(lp, sid) for lp, sid in zip(lps, out_ids, strict=False)]
                     if logprobs is not None else None)
        return Completion(text, plain_out, finish, server_prompt, out_ids,
                          {"client_map_seconds": t_map + t_unmap, "server_seconds": t_server}, plain_lps)

    def plain_logprob(self, lp: tuple[float, dict[int, float]] | None, server_id: int) -> tuple[float, dict]:
        """A token's log-probabilities with the server's ids mapped back to plain ids."""
        if lp is None:
            raise AloeError(f"the server returned no log-probabilities for token {server_id}")
        own, top = lp
        return own, {int(p): v for p, v in zip(self.map.from_server(list(top)), top.values(), strict=True)}


def top_logprobs(logits, chosen: int, k: int) -> tuple[float, dict[int, float]]:
    """The chosen id's log-probability under ``logits`` and the ``k`` likeliest ids' (the chosen one among them)."""
    import torch

    row = torch.log_softmax(logits.reshape(-1).double(), -1)
    top = {int(i): float(row[i]) for i in row.topk(k).indices} if k else {}
    top.setdefault(int(chosen), float(row[chosen]))
    return float(row[chosen]), top


def server_logprobs(backend: str, part: dict, ids: list, k: int | None) -> list:
    """The log-probabilities a server sent with ``ids`` (one stream chunk, or a whole answer): for each, its own
    and the k likeliest, by server id; ``None`` each where none were asked for. vLLM's and aloe serve's
    completion logprobs (tokens as ``token_id:N``) or llama-server's ``completion_probabilities``."""
    if k is None:
        return [None] * len(ids)
    out = []
    try:
        if backend == "openai":
            lp = part.get("logprobs") or {}
            rows = zip(lp.get("token_logprobs") or [], lp.get("top_logprobs") or [], strict=True)
            for own, top in rows:
                out.append((float(own), {int(t.removeprefix("token_id:")): float(v) for t, v in top.items()}))
        else:
            for entry in part.get("completion_probabilities") or []:
                top = {int(t["id"]): float(t["logprob"]) for t in entry.get("top_logprobs") or []}
                top = dict(sorted(top.items(), key=lambda kv: -kv[1])[:k])
                top.setdefault(int(entry["id"]), float(entry["logprob"]))
                out.append((float(entry["logprob"]), top))
    except (KeyError, TypeError, ValueError) as exc:
        raise AloeError(f"the server's log-probabilities are malformed ({exc!r}); token ids are needed") from None
    if len(out) != len(ids):
        raise AloeError(f"the server sent log-probabilities for {len(out)} of {len(ids)} tokens")
    return out


def check_sampling(s: dict) -> None:
    """Refuse sampling settings outside the ranges OpenAI's API and vLLM accept (``top_p``, ``min_p``,
    ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``) with a one-line error."""
    if not 0.0 < s["top_p"] <= 1.0:
        raise AloeError(f"top_p must lie in (0, 1], got {s['top_p']}")
    if not 0.0 <= s["min_p"] <= 1.0:
        raise AloeError(f"min_p must lie in [0, 1], got {s['min_p']}")
    if not s["repetition_penalty"] > 0:
        raise AloeError(f"repetition_penalty must be > 0, got {s['repetition_penalty']}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= s[name] <= 2.0:
            raise AloeError(f"{name} must lie in [-2, 2], got {s[name]}")


class OutputPenalty:
    """OpenAI's presence and frequency penalties as a logits processor: each token's logit less ``frequency`` times
    the number of times it was picked in this reply so far and ``presence`` once if it was picked at all. Only the
    reply counts (as in OpenAI's and vLLM's API), not the prompt: the first call's ids are taken as the prompt. Both
    act on ids alone, so they commute with the vocabulary permutation. transformers has no such processor."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency, self.start = float(presence), float(frequency), None

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        picked = input_ids[:, self.start:]
        if picked.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, picked, torch.ones_like(picked, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class Sampler:
    """Next-token choice on the client (embeds mode), with transformers' own logits processors in transformers'
    order: the repetition penalty, the presence and frequency penalties (:class:`OutputPenalty`), temperature,
    top-k, top-p, min-p. All of them commute with the vocabulary permutation, so they act on obfuscated-order
    logits directly; ``logit_bias`` keys are already obfuscated ids. A request seed makes sampling reproducible;
    without one the generator is keyed from the OS CSPRNG."""

    def __init__(self, body: dict) -> None:
        import secrets

        import torch
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.greedy = body["temperature"] == 0
        procs = []
        if body["repetition_penalty"] != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(body["repetition_penalty"]))
        presence, frequency = body.get("presence_penalty", 0.0), body.get("frequency_penalty", 0.0)
        if presence or frequency:
            procs.append(OutputPenalty(presence, frequency))
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(body["temperature"]))
            if body["top_k"] > 0:
                procs.append(TopKLogitsWarper(body["top_k"]))
            if body["top_p"] < 1.0:
                procs.append(TopPLogitsWarper(body["top_p"]))
            if body.get("min_p", 0.0) > 0:
                procs.append(MinPLogitsWarper(body["min_p"]))
        self.procs = LogitsProcessorList(procs)
        self.bias = body.get("logit_bias") or {}
        seed = body.get("seed")
        self.gen = torch.Generator().manual_seed(int(seed) if seed is not None else secrets.randbits(63))

    def __call__(self, ids: list[int], logits) -> int:
        import torch

        scores = logits.reshape(1, -1).clone()
        for k, v in self.bias.items():
            scores[0, int(k)] += v
        scores = self.procs(torch.as_tensor([ids], dtype=torch.long), scores)
        if self.greedy:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.gen))


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list | tuple) and all(isinstance(i, int | np.integer) for i in prompt) and bool(prompt)

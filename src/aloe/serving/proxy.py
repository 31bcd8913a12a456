"""``aloe proxy``: a local OpenAI-compatible endpoint in plain text in front of an untrusted AloePri server.

Apps talk to the proxy as to any OpenAI server (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``;
streaming or not). The proxy holds the secret: it applies the chat template, maps the prompt ids with tau, sends
token ids to the untrusted server through :class:`~aloe.obfuscation.client.PrivateClient`, maps the answer back,
detokenizes incrementally and applies stop *strings* on the plain text. It listens on loopback only; the secret
never appears in a response or a log line. ``/`` is a chat page, ``/aloe/last-exchange`` shows what the server
saw and sent for the latest request (obfuscated ids and their meaningless text), and ``/aloe/info`` says which
server the proxy talks to and how much of what it sees the suite's strongest attack read on its profile.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from aloe import AloeError
from aloe.obfuscation.client import IncrementalDecoder, PrivateClient, ServerError
from aloe.serving.errors import validation_message

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
MAX_BODY_BYTES = 1 << 20


class ProxyError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)                      # extensions that commute with the permutation
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    user: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def k(self) -> int | None:
        """How many likeliest tokens to give with each answer token's log-probability, or None for no logprobs."""
        if self.top_logprobs is not None and self.logprobs is not True:
            raise ProxyError(400, "top_logprobs: set logprobs to true to use it")
        if self.logprobs not in (None, False, True):
            raise ProxyError(400, "logprobs: true or false (top_logprobs says how many)")
        return (self.top_logprobs or 0) if self.logprobs else None


class TextRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False

    def k(self) -> int | None:
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True or not 0 <= self.logprobs <= 20:
            raise ProxyError(400, "logprobs: the number of likeliest tokens to give, 0-20")
        return int(self.logprobs)


class TokenTexts:
    """What a plain token reads as (``token``) and its exact bytes (``bytes``, which a token holding part of a UTF-8
    character needs): byte-level BPE pieces through their byte table, SentencePiece's ``<0xHH>`` byte pieces as
    that byte, other pieces with the word-boundary mark as a space."""

    def __init__(self, tokenizer) -> None:
        import tokenizers
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and isinstance(backend.decoder, tokenizers.decoders.ByteLevel)
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, pid: int) -> tuple[str, list[int]]:
        if pid not in self.cache:
            piece = self.tokenizer.convert_ids_to_tokens(int(pid))
            if self.byte_level and all(c in self.byte_of for c in piece):
                raw = bytes(self.byte_of[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = piece.replace("\u2581", " ").encode()
            self.cache[pid] = (self.tokenizer.decode([int(pid)]), list(raw))
        return self.cache[pid]


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ProxyError(400, "stop: give at most 4 non-empty strings")
    return stops


def _text_of(message: _Message) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ProxyError(400, "messages: only text content parts are supported")
        parts.append(part["text"])
    return "".join(parts)


class StopCutter:
    """Plain text in pieces in, text safe to show out: cut before the first stop string, and hold back a tail that
    could still grow into one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            return self._release(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


class Proxy:
    """The proxy's state: one PrivateClient (the secret), the model name, and the latest exchange's server view."""

    def __init__(self, client: PrivateClient, default_max_tokens: int = 256) -> None:
        self.client = client
        self.default_max_tokens = default_max_tokens
        self.model = client.model or "aloe-private"
        self.lock = threading.Lock()
        self.last: dict | None = None
        self.texts = TokenTexts(client.tokenizer)

    def chat_logprob(self, pid: int, lp: tuple[float, dict[int, float]], k: int) -> dict:
        """One answer token in OpenAI's chat ``logprobs.content`` form (plain tokens, the k likeliest)."""
        def one(i, v):
            text, raw = self.texts(i)
            return {"token": text, "logprob": v, "bytes": raw}

        own, top = lp
        ranked = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        return dict(one(pid, own), top_logprobs=[one(i, v) for i, v in ranked])

    def text_logprobs(self, entries: list[tuple[int, tuple[float, dict[int, float]], int]]) -> dict:
        """OpenAI's legacy completion ``logprobs`` of these answer tokens (plain id, log-probabilities, where the
        token's text begins in the answer's text)."""
        return {"tokens": [self.texts(pid)[0] for pid, _, _ in entries],
                "token_logprobs": [own for _, (own, _), _ in entries],
                "top_logprobs": [{self.texts(i)[0]: v for i, v in top.items()} for _, (_, top), _ in entries],
                "text_offset": [offset for *_, offset in entries]}

    def record(self, stream, finish: str) -> None:
        sent, got, view = list(stream.server_prompt_ids), list(stream.server_output_ids), self.client.server_view
        last = {"server_prompt_ids": sent, "server_output_ids": got, "server_prompt_text": view(sent),
                "server_output_text": view(got), "finish_reason": finish, "time": time.time()}
        if self.client.backend == "embeds":  # the server saw vectors and sent hidden states: no id, no text
            d = self.client.vocab.hidden_size
            last.update(server_prompt_text=f"[{stream.server_vectors} input vectors of {d} floats; no token id]",
                        server_output_text=f"[{len(stream.token_ids)} final hidden states of {d} floats; the "
                                           "head is applied by the client]")
        with self.lock:
            self.last = last

    def run(self, prompt, req: _Sampling, max_tokens: int | None, k: int | None = None,
            logprobs: list | None = None) -> Iterator[str | dict]:
        """Yield the answer's plain text pieces, then one dict: finish reason and usage. With ``k``, each answer
        token's ``(plain id, (log-probability, top ones), where its text begins in the answer)`` is appended to
        ``logprobs`` as it arrives (before the text it makes is yielded)."""
        stops = _stops(req.stop)
        stream = self.client.open_stream(prompt, max_tokens=max_tokens or self.default_max_tokens,
                                         temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                         repetition_penalty=req.repetition_penalty, min_p=req.min_p,
                                         presence_penalty=req.presence_penalty,
                                         frequency_penalty=req.frequency_penalty, seed=req.seed, logprobs=k)
        decoder, cutter = IncrementalDecoder(self.client.detokenize), StopCutter(stops)
        tokens = iter(stream)
        try:
            for pid in tokens:
                if k is not None:
                    logprobs.append((pid, stream.logprobs[-1], decoder.released))
                if piece := cutter.push(decoder.push(pid)):
                    yield piece
                if cutter.stopped:
                    break
            if not cutter.stopped and (piece := cutter.push(decoder.flush()) + cutter.flush()):
                yield piece
        except GeneratorExit:  # the app went away mid-answer (the page's Stop): the server's stream is closed below
            tokens.close()
            self.record(stream, "cancelled")
            raise
        finally:
            tokens.close()
        finish = "stop" if cutter.stopped else (stream.finish_reason or "length")
        self.record(stream, finish)
        n_out = len(stream.token_ids)
        yield {"finish_reason": finish, "usage": {"prompt_tokens": len(stream.prompt_ids), "completion_tokens": n_out,
                                                  "total_tokens": len(stream.prompt_ids) + n_out}}


class _ClosingStream(StreamingResponse):
    """A streamed answer whose generator is closed as soon as the response ends, the app gone away included (the
    chat page's Stop), so that the server's stream is closed then and not whenever the generator is collected."""

    def __init__(self, events: Iterator[str], **kwargs) -> None:
        super().__init__(events, **kwargs)
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        while self.events.gi_running:  # the piece being read when the app went away: it comes within a token
            time.sleep(0.005)
        self.events.close()


def privacy_statement(client: PrivateClient) -> dict:
    """What the chat page says of how much the server can read: the profile the server says it serves and the
    recovery of the suite's strongest attack on it, as measured (``benchmarks/privacy.py``, carried by the artifact),
    or that it is not stated. Never a claim the measurement does not make."""
    art = client.artifact or {}
    profile = (art.get("profile") or {}).get("name") or None
    risk = art.get("measured_risk") or {}
    out = {"profile": profile, "attack": None, "recovery": None, "measured_as": None, "measured_on": None}
    if client.backend == "embeds":
        sees = "input vectors and returns final hidden states (the client holds the vocabulary)"
        text = ("How much of them a server holding the public model reads is measured in docs/attacks.md "
                "(client-held vocabulary); the server does not state it.")
        return dict(out, sees=sees, text=text)
    sees = "obfuscated token ids"
    if not art:
        text = (f"The server does not say which profile it serves ({client.backend} backend), so how much of the ids "
                "it can read is not stated here; docs/attacks.md has the measured figures per profile.")
    elif risk.get("status") == "measured" and risk.get("recovery"):
        attack, rec = max(risk["recovery"].items(), key=lambda kv: kv[1])
        on = f" on {risk['measured_on']}" if risk.get("measured_on") else ""
        out.update(attack=attack, recovery=float(rec), measured_as=risk.get("measured_as"),
                   measured_on=risk.get("measured_on"))
        text = (f"Profile '{profile}', measured as '{risk.get('measured_as')}'{on}: the strongest attack of the "
                f"suite ({attack}) reads {100 * rec:.1f}% of the vocabulary.")
    else:
        where = (f" for this model (the profiles were measured on {risk['measured_on']})"
                 if risk.get("measured_on") else "")
        text = f"Profile '{profile or 'unnamed'}': how much of the ids a server can read is not measured{where}."
    return dict(out, sees=sees, text=text)


def _server_failure(exc: Exception) -> ProxyError:
    if isinstance(exc, ServerError):
        if exc.kind == "timeout":
            return ProxyError(504, str(exc), "timeout_error")
        if exc.kind == "status" and exc.status is not None and 400 <= exc.status < 500:
            return ProxyError(400, f"the untrusted server refused the request: {exc}")
        if exc.kind == "status" and exc.status == 503:
            return ProxyError(503, str(exc), "server_busy")
        return ProxyError(502, str(exc), "upstream_error")
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, AloeError):
        return ProxyError(400, str(exc))
    return ProxyError(502, f"bad answer from the untrusted server ({type(exc).__name__})", "upstream_error")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())[:500]


def _error_body(err: ProxyError) -> dict:
    return {"error": {"message": _one_line(err.message), "type": err.kind}}


def create_proxy_app(client: PrivateClient, default_max_tokens: int = 256) -> FastAPI:
    """The proxy as an ASGI app around an already verified client."""
    proxy = Proxy(client, default_max_tokens)
    app = FastAPI(title="aloe privacy proxy", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.proxy = proxy
    static = resources.files("aloe.serving") / "static"

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        host = request.headers.get("host", "")
        name = host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0]
        if name not in LOOPBACK_NAMES:  # a page elsewhere reaching us through a rebound DNS name
            return JSONResponse(_error_body(ProxyError(403, "the proxy answers only requests addressed to "
                                                            "127.0.0.1, localhost or [::1]")), 403)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return JSONResponse(_error_body(ProxyError(413, f"request body over {MAX_BODY_BYTES} bytes")), 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        return JSONResponse(_error_body(ProxyError(400, validation_message(exc))), 400)

    @app.exception_handler(ProxyError)
    async def proxy_error(_request: Request, exc: ProxyError):
        return JSONResponse(_error_body(exc), exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        return JSONResponse(_error_body(ProxyError(500, f"internal error ({type(exc).__name__})", "server_error")),
                            500)

    def respond(pieces: Iterator[str | dict], req: _Sampling, chunk, final, logprobs: list) -> object:
        """Non-streaming: collect. Streaming: SSE. Failures before the first piece get a status code; later ones
        an error event in the stream. ``logprobs``: the answer tokens' log-probabilities as ``pieces`` fills it;
        each chunk carries those of the tokens that arrived since the last one."""
        def take() -> list:
            out = logprobs[:]
            del logprobs[:len(out)]
            return out

        try:
            first = next(pieces)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line JSON error
            raise _server_failure(exc) from None
        if not req.stream:
            text, end = [], first
            try:
                while isinstance(end, str):
                    text.append(end)
                    end = next(pieces)
            except Exception as exc:  # noqa: BLE001
                raise _server_failure(exc) from None
            return final("".join(text), end, take())
        created, rid = int(time.time()), uuid.uuid4().hex

        def events():
            item = first
            try:
                yield chunk(rid, created, None, None, [])
                while isinstance(item, str):
                    yield chunk(rid, created, item, None, take())
                    item = next(pieces)
                yield chunk(rid, created, None, item, take())
            except Exception as exc:  # noqa: BLE001
                yield f"data: {json.dumps(_error_body(_server_failure(exc)))}\n\n"
            finally:
                pieces.close()
            yield "data: [DONE]\n\n"

        return _ClosingStream(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": proxy.model, "object": "model", "created": 0, "owned_by": "aloe"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m)}
                    for m in req.messages]
        try:
            prompt = client.chat_ids(messages)
        except Exception as exc:  # noqa: BLE001 - a template that refuses this conversation
            raise ProxyError(400, f"messages: the chat template refused them ({exc})") from None
        k, logprobs = req.k(), []
        pieces = proxy.run(prompt, req, req.max_completion_tokens or req.max_tokens, k, logprobs)

        def content(entries):
            return None if k is None else {"content": [proxy.chat_logprob(pid, lp, k) for pid, lp, _ in entries]}

        def chunk(rid, created, text, end, entries):
            if end is not None:
                delta, finish = {}, end["finish_reason"]
            else:
                delta, finish = ({"content": text} if text is not None else {"role": "assistant", "content": ""}), None
            body = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                    "model": proxy.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                       "logprobs": content(entries)}]}
            if end is not None:
                body["usage"] = end["usage"]
            return f"data: {json.dumps(body)}\n\n"

        def final(text, end, entries):
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": proxy.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                       "finish_reason": end["finish_reason"],
                                                       "logprobs": content(entries)}],
                    "usage": end["usage"]}

        return respond(pieces, req, chunk, final, logprobs)

    @app.post("/v1/completions")
    def completions(req: TextRequest):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ProxyError(400, "prompt: give one string (batches are not supported)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = list(client.tokenizer(prompt)["input_ids"])
        if not prompt:
            raise ProxyError(400, "prompt: empty")
        vocab = len(client.map.tau)
        if any(not 0 <= i < vocab for i in prompt):
            raise ProxyError(400, f"prompt: token ids must lie in 0..{vocab - 1}")
        if req.echo:
            raise ProxyError(400, "echo is not supported")
        k, logprobs = req.k(), []
        pieces = proxy.run(prompt, req, req.max_tokens, k, logprobs)

        def choice(text, finish, entries):
            lp = None if k is None else proxy.text_logprobs(entries)
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}

        def chunk(rid, created, text, end, entries):
            if text is None and end is None:
                return ""
            body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": proxy.model,
                    "choices": [choice(text or "", end and end["finish_reason"], entries)]}
            if end is not None:
                body["usage"] = end["usage"]
            return f"data: {json.dumps(body)}\n\n"

        def final(text, end, entries):
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": proxy.model, "choices": [choice(text, end["finish_reason"], entries)],
                    "usage": end["usage"]}

        return respond(pieces, req, chunk, final, logprobs)

    @app.get("/aloe/info")
    def info():
        return {"model": proxy.model, "backend": client.backend, "server": client.server,
                "privacy": privacy_statement(client)}

    @app.get("/aloe/last-exchange")
    def last_exchange():
        with proxy.lock:
            return {"exchange": proxy.last}

    @app.get("/")
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def connect(server: str, secret, tokenizer, backend: str = "openai", timeout: float = 300.0,
            client_vocab=None) -> PrivateClient:
    """A client that has checked the server: reachable, and (where it says) serving this secret's artifact."""
    client = PrivateClient(server, secret, tokenizer, backend=backend, timeout=timeout, client_vocab=client_vocab)
    info = client.verify()
    fp = (((info.get("data") or [{}])[0].get("aloe") or {}).get("secret_fingerprint")
          if backend != "llama.cpp" else None)
    if fp is None:
        print("aloe proxy: note: the server does not say which artifact it serves; not checked", file=sys.stderr)
    return client


def run_proxy(server: str, secret, tokenizer, backend: str = "openai", host: str = "127.0.0.1", port: int = 8100,
              timeout: float = 300.0, log_level: str = "warning", client_vocab=None) -> None:
    import uvicorn

    if host not in LOOPBACK:
        raise AloeError("the proxy speaks plain text: it listens on loopback only (127.0.0.1, localhost or ::1)")
    client = connect(server, secret, tokenizer, backend, timeout, client_vocab)
    print(f"aloe proxy: http://{host}:{port}/ (OpenAI API at /v1) -> {client.server} [{backend}]", file=sys.stderr)
    uvicorn.run(create_proxy_app(client), host=host, port=port, log_level=log_level)

"""``aloe serve``: an OpenAI-compatible completions server over an unmodified transformers engine.

It is the untrusted side: it loads the obfuscated checkpoint with plain ``AutoModelForCausalLM`` and generates with
the library's own ``generate`` (KV cache, sampling) — it knows nothing of the obfuscation and holds no secret.
Prompts are token-id lists (as vLLM accepts); every choice carries ``token_ids``. Requests are bounded in size,
length and concurrency; malformed ones get a 4xx with the reason.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from aloe import AloeError
from aloe.obfuscation.client import IncrementalDecoder, OutputPenalty, top_logprobs
from aloe.obfuscation.client_vocab import decode_array
from aloe.serving.errors import validation_message


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    max_waiting: int = 16           # requests queued behind the running one; beyond this: 503
    max_body_bytes: int = 1 << 20
    max_sessions: int = 16          # client-held vocabulary: KV caches kept; the least recently used goes first
    session_idle_seconds: float = 600.0


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: list[int] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    return_token_ids: bool = True
    skip_special_tokens: bool = True
    logprobs: int | None = Field(None, ge=0, le=20)     # the model's own log-probabilities, as vLLM returns them
    return_tokens_as_token_ids: bool = False
    user: str | None = None


class EmbedsRequest(BaseModel):
    """One step of the client-held vocabulary mode: the next input vectors of a session (base64 float32 rows of the
    model's hidden size); the answer is the final hidden state of the last one."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    session: str | None = Field(None, max_length=64)
    embeds: str = Field(min_length=1)


class _IdStreamer(BaseStreamer):
    """Receives the ids ``generate`` produces; the first call carries the prompt and is skipped."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i in value.reshape(-1).tolist():
            self.q.put(int(i))

    def end(self):
        self.q.put(None)


class _Logprobs:
    """A logits processor that changes nothing: it keeps each step's logits of the model itself (before logit_bias,
    penalties, temperature and truncation, as vLLM's default), for the ``logprobs`` of the answer."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores[0].detach().clone())
        return scores

    def entry(self, step: int, chosen: int, k: int) -> tuple[float, dict[int, float]]:
        """The chosen id's log-probability at ``step`` and the ``k`` likeliest ids' (the chosen one always among
        them, as OpenAI's legacy API and vLLM give it)."""
        return top_logprobs(self.rows[step], chosen, k)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class _Bias:
    """logit_bias as a logits processor (ids are whatever vocabulary the model speaks)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids, scores):
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class TransformersEngine:
    """One obfuscated (or plain) checkpoint on stock transformers; one generation at a time."""

    def __init__(self, model_dir: Path, limits: Limits, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise AloeError(f"{model_dir} is not a model folder (no config.json)")
        has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if has_tokenizer else None
        except Exception as exc:  # noqa: BLE001 - a broken folder (config, weights, tokenizer) is the user's input
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise AloeError(f"cannot load the model in {model_dir}: {type(exc).__name__}: {reason}") from None
        self.name = model_dir.name
        self.vocab = int(self.model.config.vocab_size)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        manifest = model_dir / "aloe.json"
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        self.client_held = bool((self.manifest or {}).get("client_held_vocabulary"))
        self.hidden_size = int(self.model.config.hidden_size)
        self.sessions: OrderedDict[str, list] = OrderedDict()   # id -> [KV cache, length, last use]
        self.limits = limits
        self.lock = threading.Lock()
        self.waiting = 0
        self.waiting_lock = threading.Lock()

    def check(self, req: CompletionRequest) -> str | None:
        if self.client_held:
            return "this artifact holds no vocabulary: the client drives it with inputs_embeds at /v1/aloe/embeds"
        if len(req.prompt) > self.limits.max_prompt_tokens:
            return f"prompt has {len(req.prompt)} tokens; the limit is {self.limits.max_prompt_tokens}"
        if req.max_tokens > self.limits.max_new_tokens:
            return f"max_tokens {req.max_tokens} exceeds the limit {self.limits.max_new_tokens}"
        if len(req.prompt) + req.max_tokens > self.context:
            return f"prompt + max_tokens exceeds the model's context of {self.context} tokens"
        for name, ids in (("prompt", req.prompt), ("stop_token_ids", req.stop_token_ids),
                          ("logit_bias", [int(k) for k in (req.logit_bias or {}) if k.lstrip("-").isdigit()])):
            bad = [i for i in ids if not 0 <= i < self.vocab]
            if bad:
                return f"{name} token id {bad[0]} is outside the vocabulary 0..{self.vocab - 1}"
        if req.logit_bias and any(not k.isdigit() for k in req.logit_bias):
            return "logit_bias keys must be token ids"
        return None

    def step(self, session: str | None, embeds: np.ndarray) -> tuple[str, np.ndarray, int]:
        """Run the next input vectors of ``session`` (a new one when None) through the model with its KV cache;
        the final hidden state of the last position comes back."""
        with self.lock:
            now = time.monotonic()
            for sid in [s for s, v in self.sessions.items() if now - v[2] > self.limits.session_idle_seconds]:
                del self.sessions[sid]
            if session is None:
                while len(self.sessions) >= self.limits.max_sessions:
                    self.sessions.popitem(last=False)
                session, state = uuid.uuid4().hex, [None, 0, now]
            elif session in self.sessions:
                state = self.sessions.pop(session)
            else:
                raise KeyError(session)
            limit = min(self.context, self.limits.max_prompt_tokens + self.limits.max_new_tokens)
            if state[1] + len(embeds) > limit:
                raise ValueError(f"session would reach {state[1] + len(embeds)} positions; the limit is {limit}")
            with torch.no_grad():
                out = self.model.model(inputs_embeds=torch.from_numpy(embeds.copy())[None].to(self.model.dtype),
                                       cache=state[0], use_cache=True)
            state = [out.cache, state[1] + len(embeds), now]
            self.sessions[session] = state
            return session, out.last_hidden_state[0, -1].float().numpy(), state[1]

    def close_session(self, session: str) -> bool:
        with self.lock:
            return self.sessions.pop(session, None) is not None

    def admit(self) -> bool:
        with self.waiting_lock:
            if self.waiting >= self.limits.max_waiting + 1:
                return False
            self.waiting += 1
            return True

    def release(self) -> None:
        with self.waiting_lock:
            self.waiting -= 1

    def generate(self, req: CompletionRequest, streamer: _IdStreamer, cancel: threading.Event,
                 logprobs: _Logprobs | None = None) -> None:
        """Run ``generate`` (under the engine lock); ids arrive through ``streamer``."""
        kwargs = {"max_new_tokens": req.max_tokens, "eos_token_id": self.eos + list(req.stop_token_ids),
                  "pad_token_id": self.eos[0] if self.eos else 0, "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)])}
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k if req.top_k > 0 else 0, min_p=req.min_p or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        # logit_bias first, then the penalties (llama.cpp's and vLLM's order, and the client's own sampler's), then
        # generate's temperature and truncation; the request's repetition penalty replaces any the checkpoint's
        # generation config sets, which generate would otherwise run before the bias
        kwargs["repetition_penalty"] = 1.0
        processors = [logprobs] if logprobs is not None else []
        if req.logit_bias:
            processors.append(_Bias({int(k): v for k, v in req.logit_bias.items()}))
        if req.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(req.repetition_penalty))
        if req.presence_penalty or req.frequency_penalty:
            processors.append(OutputPenalty(req.presence_penalty, req.frequency_penalty))
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        ids = torch.tensor([req.prompt], dtype=torch.long)
        try:
            with self.lock, torch.no_grad():
                if req.seed is not None:
                    torch.manual_seed(req.seed)  # sampling reproducibility only; nothing secret is drawn here
                self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        finally:
            streamer.end()


def create_app(model_dir: Path, limits: Limits | None = None, threads: int | None = None) -> FastAPI:
    limits = limits or Limits()
    engine = TransformersEngine(model_dir, limits, threads)
    app = FastAPI(title="aloe completions server", version="1")
    app.state.engine = engine

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            return JSONResponse({"error": {"message": f"request body over {limits.max_body_bytes} bytes",
                                           "type": "invalid_request_error"}}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        return JSONResponse({"error": {"message": validation_message(exc), "type": "invalid_request_error"}},
                            status_code=422)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        entry = {"id": engine.name, "object": "model", "owned_by": "aloe", "max_model_len": engine.context}
        if engine.manifest:
            said = ("format", "secret_fingerprint", "profile", "measured_risk")  # public: no part of the secret
            entry["aloe"] = {k: engine.manifest.get(k) for k in said}
            entry["aloe"].update(client_held_vocabulary=engine.client_held, hidden_size=engine.hidden_size)
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        problem = engine.check(req)
        if problem:
            return error(422, problem)
        if not engine.admit():
            return error(503, "server busy: too many requests waiting")
        streamer, cancel = _IdStreamer(), threading.Event()
        recorder = _Logprobs() if req.logprobs is not None else None
        worker = threading.Thread(target=_run, args=(engine, req, streamer, cancel, recorder), daemon=True)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def name(i: int) -> str:
            if req.return_tokens_as_token_ids or engine.tokenizer is None:
                return f"token_id:{i}"
            return engine.tokenizer.decode([i])

        def decode(ids) -> str:
            return (engine.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens)
                    if ids and engine.tokenizer is not None else "")

        def logprobs(ids, first, offsets):
            """vLLM's (and OpenAI's legacy) completion logprobs of ``ids``, the answer's tokens from ``first`` on;
            ``offsets``: where each token's text begins in the answer's text (the incremental decoder's)."""
            if recorder is None:
                return None
            entries = [recorder.entry(first + n, i, req.logprobs) for n, i in enumerate(ids)]
            return {"tokens": [name(i) for i in ids], "token_logprobs": [lp for lp, _ in entries],
                    "top_logprobs": [{name(j): v for j, v in top.items()} for _, top in entries],
                    "text_offset": list(offsets)}

        def chunk(ids, finish, text, first=0, offsets=()):
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish,
                                 "logprobs": logprobs(ids, first, offsets)}]}

        def finish_reason(out: list[int]) -> str:
            return "stop" if out and out[-1] in set(engine.eos) | set(req.stop_token_ids) else "length"

        worker.start()
        decoder = IncrementalDecoder(decode)  # each token's text released once whole: no split UTF-8 character
        if req.stream:
            def events():
                out: list[int] = []
                try:
                    while (i := streamer.q.get()) is not None:
                        out.append(i)
                        piece = decoder.push(i)
                        yield f"data: {json.dumps(chunk([i], None, piece, len(out) - 1, decoder.offsets[-1:]))}\n\n"
                    yield f"data: {json.dumps(chunk([], finish_reason(out), decoder.flush()))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    cancel.set()
            return StreamingResponse(events(), media_type="text/event-stream")
        out = []
        while (i := streamer.q.get()) is not None:
            out.append(i)
            decoder.push(i)
        worker.join()
        body = chunk(out, finish_reason(out), decode(out), 0, decoder.offsets)
        body["usage"] = {"prompt_tokens": len(req.prompt), "completion_tokens": len(out),
                         "total_tokens": len(req.prompt) + len(out)}
        return body

    @app.post("/v1/aloe/embeds")
    def embeds(req: EmbedsRequest):
        """The client-held vocabulary mode: input vectors in, the last final hidden state out (base64 float32)."""
        try:
            rows = decode_array(req.embeds, engine.hidden_size)
        except AloeError as exc:
            return error(422, str(exc))
        if not len(rows):
            return error(422, "embeds: give at least one row")
        if not engine.admit():
            return error(503, "server busy: too many requests waiting")
        try:
            session, hidden, length = engine.step(req.session, rows)
        except KeyError:
            return error(404, "unknown or expired session; start a new one")
        except ValueError as exc:
            return error(422, str(exc))
        finally:
            engine.release()
        return {"session": session, "hidden": base64.b64encode(hidden.astype("<f4").tobytes()).decode(),
                "length": length}

    @app.delete("/v1/aloe/sessions/{session}")
    def close(session: str):
        if not engine.close_session(session):
            return error(404, "unknown or expired session")
        return {"closed": session}

    return app


def _run(engine: TransformersEngine, req: CompletionRequest, streamer: _IdStreamer, cancel: threading.Event,
         logprobs: _Logprobs | None = None):
    try:
        engine.generate(req, streamer, cancel, logprobs)
    finally:
        engine.release()


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          threads: int | None = None, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(model_dir, limits, threads), host=host, port=port, log_level=log_level)

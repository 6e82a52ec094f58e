"""The OpenAI-compatible HTTP app of `mmdomain serve`: ``GET /v1/models`` and ``POST /v1/chat/completions``
(whole or streamed as server-sent events), one model behind a lock so concurrent requests wait their turn, with
limits on body bytes, media items, pixels and ``max_tokens``, and an optional API key."""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at run time, and
# they are imported inside create_app, where postponed strings could not be resolved.
import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from .serve_media import MediaPolicy, RequestRefused, parse_messages

if TYPE_CHECKING:  # torch loads only when a server is made, not when the CLI builds its parser
    from .generation import GenerationOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """Each refusal names its flag: --max-body-bytes, --max-tokens-limit, --max-waiting (and the media policy's)."""

    max_body_bytes: int = 20_000_000
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_waiting: int = 32
    """Requests queued for the model beyond the one running; more are refused with 503 (retry later)."""
    max_beams: int = 8
    """Largest num_beams: beams multiply the memory and time of a request as max_tokens does."""
    media: MediaPolicy = field(default_factory=MediaPolicy)


class _Queue:
    """One model, one generation at a time: requests wait on an asyncio lock in arrival order; past ``max_waiting``
    waiting ones, a new request is refused instead of piling up."""

    def __init__(self, max_waiting: int) -> None:
        self.lock, self.max_waiting, self.waiting = asyncio.Lock(), max_waiting, 0

    def check(self) -> None:
        if self.lock.locked() and self.waiting >= self.max_waiting:
            raise RequestRefused(f"{self.waiting} requests are already waiting for the model (limit --max-waiting); retry later",
                                 status=503, code="server_busy", kind="server_error")

    async def __aenter__(self) -> None:
        self.check()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *exc: Any) -> None:
        self.lock.release()


def request_options(body: dict[str, Any], limits: ServeLimits) -> "GenerationOptions":
    """The decoding a request asks for. Absent or 0 ``temperature`` decodes greedily (a domain model's answers are
    scored that way); above 0 it samples. ``top_k``, ``repetition_penalty`` and ``num_beams`` are accepted as vLLM
    accepts them."""
    def number(name: str, kind: type, default: Any) -> Any:
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and not float(value).is_integer()):
            # Python's json reads NaN and Infinity; a NaN temperature would pass every range check and decode greedily.
            raise RequestRefused(f"{name} must be a{'n integer' if kind is int else ' finite number'}, got {value!r}", param=name)
        return kind(value)

    from .generation import GenerationError, GenerationOptions

    if number("n", int, 1) != 1:
        raise RequestRefused("n must be 1: this server returns one choice per request", param="n")
    max_tokens = number("max_completion_tokens", int, None) or number("max_tokens", int, limits.default_max_tokens)
    if max_tokens > limits.max_tokens:
        raise RequestRefused(f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens} (--max-tokens-limit)",
                             param="max_tokens", code="max_tokens_too_large")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise RequestRefused("stop must be a string or a list of at most 8 strings", param="stop")
    temperature = number("temperature", float, 0.0)
    if not 0 <= temperature <= 100:
        # Far above any useful value already (OpenAI allows up to 2); a huge one overflows the logits to inf.
        raise RequestRefused(f"temperature must be between 0 and 100, got {temperature}", param="temperature")
    seed = number("seed", int, None)
    if seed is not None and not -(2**63) <= seed < 2**63:  # torch cannot take more; it failed as a 500 mid-generation
        raise RequestRefused(f"seed must be a 64-bit integer, got {seed}", param="seed")
    num_beams = number("num_beams", int, 1)
    if num_beams > limits.max_beams:
        raise RequestRefused(f"num_beams {num_beams} is over this server's limit of {limits.max_beams} (--max-beams)", param="num_beams",
                             code="num_beams_too_large")
    sampling = {"do_sample": True, "temperature": temperature, "top_p": number("top_p", float, 1.0),
                "top_k": number("top_k", int, 0)} if temperature > 0 else {}
    try:
        return GenerationOptions(max_new_tokens=max_tokens, num_beams=num_beams, stop=tuple(s for s in stop if s),
                                 repetition_penalty=number("repetition_penalty", float, 1.0), seed=seed, **sampling)
    except GenerationError as exc:
        raise RequestRefused(str(exc)) from None


def create_app(model: Any, processor: Any, *, device: Any, model_name: str, limits: ServeLimits = ServeLimits(),
               api_key: str | None = None) -> Any:
    """The FastAPI app serving ``model`` (already on ``device``, in eval mode) as ``model_name``."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from .generation import generate_batch, stream_generate

    class ClosingStreamingResponse(StreamingResponse):
        """Closes its event generator however the response ends. Starlette stops iterating when the client hangs
        up but leaves the suspended generator to the garbage collector, and ours holds the model's lock until it
        is closed: every later request would wait behind a stream nobody reads."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()

    app = FastAPI(title="mmdomain", docs_url=None, redoc_url=None, openapi_url=None)
    queue = _Queue(limits.max_waiting)
    created = int(time.time())

    def refusal(exc: RequestRefused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused) -> JSONResponse:
        return refusal(exc)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return refusal(RequestRefused("invalid or missing API key: send it as 'Authorization: Bearer KEY'", status=401,
                                              code="invalid_api_key", kind="authentication_error"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "mmdomain"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "waiting": queue.waiting, "busy": queue.lock.locked()}

    async def read_body(request: Request) -> dict[str, Any]:
        too_big = RequestRefused(f"request body over {limits.max_body_bytes} bytes (limit --max-body-bytes); send smaller media",
                                 status=413, code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # a body without Content-Length is counted as it arrives
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestRefused("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestRefused("the request body must be a JSON object")
        return body

    def prepare(body: dict[str, Any]) -> tuple[Any, "GenerationOptions"]:
        requested = body.get("model")
        if requested not in (None, "", model_name):
            raise RequestRefused(f"model {requested!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                                 status=404, param="model", code="model_not_found")
        options = request_options(body, limits)
        chat = parse_messages(body.get("messages"), processor, limits.media)
        try:
            conversation, items = processor.decode_media(chat.conversation, chat.files) if chat.files else (chat.conversation, [])
            sample = processor(conversation, items, key="request", add_generation_prompt=True)
        except (ValueError, OSError) as exc:  # our DecodeError / SampleError: the media or the chat cannot be used
            raise RequestRefused(f"the request's media or messages cannot be used: {exc}", param="messages") from None
        return sample, options

    def envelope(request_id: str, **fields: Any) -> dict[str, Any]:
        return {"id": request_id, "created": int(time.time()), "model": model_name, **fields}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await read_body(request)
        sample, options = await run_in_threadpool(prepare, body)  # decoding media is CPU work: off the event loop
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = len(sample.input_ids)
        if body.get("stream"):
            if options.num_beams > 1:
                raise RequestRefused("streaming decodes one sequence; send num_beams 1 or stream false", param="num_beams")
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            queue.check()  # refused with its status now, before the stream's 200 is sent
            return ClosingStreamingResponse(stream_events(request_id, sample, options, prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with queue:
            done = (await run_in_threadpool(generate_batch, model, processor, [sample], options, device))[0]
        return envelope(request_id, object="chat.completion", system_fingerprint=None,
                        choices=[{"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                                  "logprobs": None, "finish_reason": done.finish_reason}],
                        usage={"prompt_tokens": prompt_tokens, "completion_tokens": done.tokens, "total_tokens": prompt_tokens + done.tokens})

    async def stream_events(request_id: str, sample: Any, options: "GenerationOptions", prompt_tokens: int,
                            include_usage: bool) -> AsyncIterator[str]:
        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return event(envelope(request_id, object="chat.completion.chunk", system_fingerprint=None,
                                  choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

        try:
            async with queue:
                stream = await run_in_threadpool(stream_generate, model, processor, sample, options, device)
                try:
                    pieces = iter(stream)
                    yield chunk({"role": "assistant", "content": ""})
                    end = object()
                    while (piece := await run_in_threadpool(next, pieces, end)) is not end:
                        yield chunk({"content": piece})
                finally:
                    # A client that hung up stops generation at the next token; the model is handed on only after.
                    with anyio.CancelScope(shield=True):
                        await run_in_threadpool(stream.close)
            yield chunk({}, stream.finish_reason)
            if include_usage:
                yield event(envelope(request_id, object="chat.completion.chunk", choices=[],
                                     usage={"prompt_tokens": prompt_tokens, "completion_tokens": stream.tokens,
                                            "total_tokens": prompt_tokens + stream.tokens}))
            yield "data: [DONE]\n\n"
        except RequestRefused as exc:  # the queue filled up meanwhile: the 200 is sent already, so the error goes in the stream
            yield event(exc.body())
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream reaches the client as an error event, and the log
            log.exception("generation failed")
            yield event({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                                   "param": None, "code": None}})

    return app

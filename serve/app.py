"""The HTTP side: OpenAI's chat-completions format in, runtime chats out (serve/batcher.py runs them).

Every error leaves as OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) with its
status; nothing a client sends can make the server print a traceback to it or stop serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runtime.engine_manifest import EngineError
from runtime.errors import ImageError, PromptError, Qwen3VLError
from runtime.memory_admission import OutOfMemoryError

from .batcher import Batcher, Job, QueueFull
from .metrics import Metrics

log = logging.getLogger("qwen3vl.serve")

# Raster formats only: PIL would hand EPS to Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class ServerConfig:
    model_name: str = "qwen3vl"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    batch_window_s: float = 0.02
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_tokens_default: int = 256
    allow_local_images: str | None = None
    allow_remote_images: bool = False
    retry_after_s: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def error_response(exc: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}},
                        status_code=exc.status, headers=exc.headers)


def runtime_error(exc: Exception) -> ApiError:
    """A runtime exception as the client should see it."""
    if isinstance(exc, OutOfMemoryError):
        return ApiError(413, str(exc), code="request_too_large")
    if isinstance(exc, PromptError) and "context" in str(exc):
        return ApiError(413, str(exc), code="context_length_exceeded")
    if isinstance(exc, ImageError):
        return ApiError(400, str(exc), param="messages", code="invalid_image")
    if isinstance(exc, Qwen3VLError) and not isinstance(exc, EngineError):
        return ApiError(400, str(exc))
    log.exception("request failed", exc_info=exc)
    return ApiError(500, "internal error while generating", kind="server_error")


# -- request parsing -------------------------------------------------------------------------------

def _number(body: dict, key: str, low: float, high: float, default=None, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} from {low} to {high}, got {value!r}", param=key)
    return value


def load_image(url: str, config: ServerConfig) -> Image.Image:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "image data URLs must be base64 (data:image/png;base64,...)", param="messages")
        if len(data) * 3 // 4 > config.max_image_bytes:
            raise ApiError(413, f"an image is over the {config.max_image_bytes}-byte limit", param="messages",
                           code="image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "an image data URL is not valid base64", param="messages", code="invalid_image")
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise ApiError(400, "remote image URLs are not fetched by this server (send a base64 data: URL, or "
                                "start it with --allow-remote-images)", param="messages", code="invalid_image")
        source = io.BytesIO(fetch_image(url, config.max_image_bytes))
    else:
        path = url[len("file://"):] if url.startswith("file://") else url
        if not config.allow_local_images:
            raise ApiError(400, "local image paths are refused (start the server with --allow-local-images DIR)",
                           param="messages", code="invalid_image")
        root = Path(config.allow_local_images).resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise ApiError(400, f"no image {path!r} under the allowed folder", param="messages", code="invalid_image")
        if target.stat().st_size > config.max_image_bytes:
            raise ApiError(413, f"an image is over the {config.max_image_bytes}-byte limit", param="messages",
                           code="image_too_large")
        source = io.BytesIO(target.read_bytes())
    try:
        image = Image.open(source, formats=IMAGE_FORMATS)
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"an image could not be read ({type(exc).__name__})", param="messages",
                       code="invalid_image")


def fetch_image(url: str, limit: int) -> bytes:
    """An image over http(s) (--allow-remote-images only), at most `limit` bytes, 10 s per read."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "qwen3vl-serve"}),
                                    timeout=10) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"the image at {url!r} could not be fetched ({type(exc).__name__})", param="messages",
                       code="invalid_image")
    if len(data) > limit:
        raise ApiError(413, f"an image is over the {limit}-byte limit", param="messages", code="image_too_large")
    return data


def parse_messages(messages, config: ServerConfig) -> list:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    chat = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            chat.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, "message content must be a string or a list of parts", param="messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ApiError(400, "image_url parts need a url", param="messages")
                parts.append({"type": "image", "image": load_image(url, config)})
            else:
                raise ApiError(400, f"unsupported content part {kind!r} (text and image_url are)", param="messages")
        chat.append({"role": message["role"], "content": parts})
    return chat


def parse_request(body, pipeline, config: ServerConfig) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    context = pipeline.manifest.max_context
    max_tokens = _number(body, "max_completion_tokens", 1, context, None, integer=True)
    max_tokens = _number(body, "max_tokens", 1, context, max_tokens or config.max_tokens_default, integer=True) \
        if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    seed = _number(body, "seed", 0, 2**63 - 1, integer=True)
    top_logprobs = _number(body, "top_logprobs", 0, 20, 0, integer=True)
    want_logprobs = body.get("logprobs", False)
    if not isinstance(want_logprobs, bool):
        raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    # temperature 0 is greedy (OpenAI's meaning); unset settings follow the engine's defaults
    greedy = temperature == 0
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", param="top_p")
    try:
        # a temperature or top_p samples (as OpenAI does); neither: the engine's defaults decide
        do_sample = False if greedy else True if temperature is not None or top_p is not None else None
        sampling = pipeline.sampling(do_sample, None if greedy else temperature, top_p, None, seed)
    except PromptError as exc:
        raise ApiError(400, str(exc))
    return dict(chat=parse_messages(body.get("messages"), config), max_tokens=max_tokens, sampling=sampling,
                logprobs=top_logprobs, want_logprobs=want_logprobs, stop=stop, stream=body.get("stream", False))


# -- the app ---------------------------------------------------------------------------------------

def usage_of(done: dict) -> dict:
    """OpenAI's usage object; prompt tokens served from the prefix cache as prompt_tokens_details."""
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done.get("cached_tokens", 0)}}


def create_app(pipeline=None, config: ServerConfig | None = None, loader=None):
    """The ASGI app over a loaded `pipeline`, or one `loader()` returns in a background thread
    (/health says 503 until it has)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    config = config or ServerConfig()
    metrics = Metrics()
    state = {"pipeline": None, "batcher": None, "load_error": None}

    def ready(pipe):
        state["batcher"] = Batcher(pipe, config.max_batch, config.max_queue, config.batch_window_s, metrics)
        state["pipeline"] = pipe

    if pipeline is not None:
        ready(pipeline)
    elif loader is not None:
        def load():
            try:
                ready(loader())
            except Exception as exc:  # reported by /health
                state["load_error"] = f"{type(exc).__name__}: {exc}"
                log.error("engine failed to load: %s", state["load_error"])
        threading.Thread(target=load, name="qwen3vl-load", daemon=True).start()

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def ready_pipeline():
        if state["pipeline"] is None:
            raise ApiError(503, "the engine is still loading" if not state["load_error"] else "the engine failed to load",
                           kind="server_error", headers={"Retry-After": str(config.retry_after_s)})
        return state["pipeline"], state["batcher"]

    async def health(request: Request):
        if state["pipeline"] is None:
            return JSONResponse({"status": "error" if state["load_error"] else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "qwen3vl-pascal"}]})

    async def metrics_route(request: Request):
        batcher = state["batcher"]
        pipe = state["pipeline"]
        reuse = pipe.reuse_stats() if pipe is not None and hasattr(pipe, "reuse_stats") else None
        return PlainTextResponse(metrics.render(batcher.depth() if batcher else 0, batcher.running if batcher else 0,
                                                reuse), media_type="text/plain; version=0.0.4")

    async def chat_completions(request: Request):
        check_key(request)
        pipe, batcher = ready_pipeline()
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > config.max_body_bytes:
            raise ApiError(413, f"the request body is over the {config.max_body_bytes}-byte limit",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, f"the request body is over the {config.max_body_bytes}-byte limit",
                           code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON")
        parsed = await asyncio.to_thread(parse_request, body, pipe, config)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(parsed["chat"], parsed["max_tokens"], parsed["sampling"], parsed["logprobs"],
                  parsed["want_logprobs"], parsed["stop"],
                  emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
        try:
            batcher.submit(job)
        except QueueFull:
            metrics.error("queue_full")
            raise ApiError(429, "the server is busy (queue full); retry shortly", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(config.retry_after_s)})
        metrics.request()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": created, "model": config.model_name}

        def logprob_content(items):
            out = []
            for token, logprob, top in items:
                text = pipe.prompts.decode([token], skip_special_tokens=False)
                out.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": (t := pipe.prompts.decode([a["token_id"]],
                                                                                  skip_special_tokens=False)),
                                              "logprob": a["logprob"], "bytes": list(t.encode())} for a in top]})
            return out

        last_check = [time.monotonic()]

        async def next_event():
            """The worker's next event, or None once the client has hung up (its row is then dropped)."""
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - last_check[0] > 0.25:  # tokens may arrive faster than any timeout
                    last_check[0] = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        metrics.error("client_disconnected")
                        return None
                if event is not None:
                    return event

        if parsed["stream"]:
            # Headers wait for the first event, so a request the runtime refuses (context, image) still
            # gets its status code instead of a 200 with an error inside the stream.
            try:
                pending = await next_event()
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if pending is None:
                return PlainTextResponse("", status_code=499)
            if pending[0] == "error":
                raise runtime_error(pending[1])

            async def sse():
                nonlocal pending
                try:
                    first = {**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                    sent_logprobs = 0
                    while True:
                        kind, payload = pending if pending is not None else await events.get()
                        pending = None
                        if kind == "error":
                            err = runtime_error(payload)
                            metrics.error(err.code or err.kind)
                            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.code}})}\n\n"
                            break
                        choice = {"index": 0, "delta": {}, "finish_reason": None}
                        if parsed["want_logprobs"] and len(job.logprob_items) > sent_logprobs:
                            choice["logprobs"] = {"content": logprob_content(job.logprob_items[sent_logprobs:])}
                            sent_logprobs = len(job.logprob_items)
                        if kind == "text":
                            choice["delta"] = {"content": payload}
                            yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"
                            continue
                        choice["finish_reason"] = payload["finish_reason"]
                        usage = usage_of(payload)
                        yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [choice], 'usage': usage, 'timings': payload['timings']})}\n\n"
                        break
                    yield "data: [DONE]\n\n"
                finally:
                    if not job.done:  # the client went away: its row stops at the next step
                        job.cancelled.set()
                        metrics.error("client_disconnected")

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            text = []
            while True:
                event = await next_event()
                if event is None:
                    return PlainTextResponse("", status_code=499)
                kind, payload = event
                if kind == "text":
                    text.append(payload)
                elif kind == "error":
                    raise runtime_error(payload)
                else:
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": payload["finish_reason"],
                  "logprobs": {"content": logprob_content(job.logprob_items)} if parsed["want_logprobs"] else None}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice],
                             "usage": usage_of(payload),
                             "timings": payload["timings"]})

    async def on_api_error(request: Request, exc: ApiError):
        if exc.status not in (429,):
            metrics.error(exc.code or exc.kind)
        return error_response(exc)

    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error", exc_info=exc)
        metrics.error("internal")
        return error_response(ApiError(500, "internal server error", kind="server_error"))

    from starlette.exceptions import HTTPException

    async def on_http(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error"))

    app = Starlette(routes=[
        Route("/health", health),
        Route("/metrics", metrics_route),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ], exception_handlers={ApiError: on_api_error, HTTPException: on_http, Exception: on_unexpected})
    app.state.batcher = lambda: state["batcher"]
    return app

"""An OpenAI-compatible HTTP server for one model: /v1/chat/completions, /v1/completions, /v1/models, /health.

The model computes one request at a time on a worker thread, through the same `stream_generate`
as every other entry point. Requests wait in a bounded FIFO queue; when it is full they get 429.
A request whose client goes away is cancelled (dropped from the queue, or stopped after its next
token), so the model is free for the next one.
"""

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import HeteroError
from .generate import SamplingParams, stream_generate
from .server_requests import ApiError, bad_request, checked_ids, parse_messages, parse_sampling, read_body

log = logging.getLogger("hetero.server")
MAX_BODY_BYTES = 1 << 20  # room for a ~100k-token conversation as JSON text
DISCONNECT_POLL_S = 0.25  # how often a waiting or streaming request checks that its client is still there
_DONE = object()


class Job:
    """One request's generation: its prompt and sampling, and a channel from the worker to the event loop."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stats: dict = {}
        self.outcome: str | None = None  # "stop" | "length" | "cancelled" | "failed"

    def emit(self, item):
        """Called on the worker thread: hand a Piece, an exception or _DONE to the request."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class Worker:
    """Runs jobs one at a time on its own thread; at most `max_queue` wait behind the one running."""

    def __init__(self, model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.running: Job | None = None
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self._thread = threading.Thread(target=self._loop, name="hetero-generate", daemon=True)
        self._thread.start()

    def stop(self):
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, self.running]:
                if job is not None:
                    job.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job):
        with self._cond:
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                self.counts["refused"] += 1
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting for the model; "
                               "retry shortly", code="queue_full", type="rate_limit_error")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job):
        """Stop a job: dropped if it still waits, stopped after its next token if it runs; no-op once done."""
        with self._cond:
            if job.outcome is None:
                job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job.outcome = "cancelled"
                self.counts["cancelled"] += 1

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                    self.counts["served" if job.outcome in ("stop", "length") else job.outcome or "failed"] += 1

    def _run(self, job: Job):
        if job.cancelled.is_set():  # its client left between leaving the queue and starting
            job.outcome = "cancelled"
            job.emit(_DONE)
            return
        gen = stream_generate(self.model.executor, self.model.tokenizer, job.prompt_ids, job.params, stats=job.stats)
        try:
            for piece in gen:
                if job.cancelled.is_set():
                    job.outcome = "cancelled"
                    break
                job.outcome = piece.finish_reason or job.outcome
                job.emit(piece)
        except Exception as e:  # a failed request must not take the worker down with it
            log.exception("generation failed")
            job.outcome = "failed"
            job.emit(e)
        finally:
            gen.close()  # runs stream_generate's cleanup now: the KV cache is freed before the next job
            job.emit(_DONE)


# ---- the app ------------------------------------------------------------------------------------

def create_app(model, name: str, max_queue: int = 8, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `model` (an OffloadedModel) as `name`.

    Args:
        max_queue: requests that may wait while one is generated; one more is refused with 429.
        max_body_bytes: larger request bodies are refused with 413.
    """
    if model.tokenizer is None:
        raise HeteroError(f"{model.path}: no tokenizer.json, so this model cannot be served over a text API")
    worker = Worker(model, max_queue)
    created = int(time.time())

    async def events(job: Job, request):
        """The job's pieces as they come; the job is cancelled if the client goes away or this stops early."""
        try:
            last_check = time.monotonic()
            while True:
                try:
                    item = await asyncio.wait_for(job.out.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - last_check >= DISCONNECT_POLL_S:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                if item is not None:
                    yield item
        finally:
            worker.cancel(job)

    def usage(job: Job) -> dict:
        n_prompt, n_out = len(job.prompt_ids), job.stats.get("generated_tokens", 0)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    async def answer(request, body: dict, job: Job, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": name}

        def choice(text: str | None, finish, first=False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if body.get("stream"):
            include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
            chunk_head = head | ({"object": "chat.completion.chunk"} if chat else {})

            def sse(obj) -> str:
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

            async def stream():
                if chat:
                    yield sse(chunk_head | {"choices": [choice(None, None, first=True)]})
                try:
                    async for piece in events(job, request):
                        if piece.text or piece.finish_reason:
                            yield sse(chunk_head | {"choices": [choice(piece.text, piece.finish_reason)]})
                except Exception as e:  # headers are sent: report the failure in the stream, as OpenAI does
                    yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                if job.outcome == "cancelled":
                    return
                if include_usage:
                    yield sse(chunk_head | {"choices": [], "usage": usage(job)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     background=BackgroundTask(worker.cancel, job),  # also when the client left
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish = [], None
        try:
            async for piece in events(job, request):
                text.append(piece.text)
                finish = piece.finish_reason or finish
        except HeteroError as e:
            raise bad_request(str(e)) from None
        if finish is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        out = "".join(text)
        msg = {"index": 0, "message": {"role": "assistant", "content": out}} if chat else {"index": 0, "text": out}
        choices = [msg | {"logprobs": None, "finish_reason": finish}]
        return JSONResponse(head | {"choices": choices, "usage": usage(job)})

    async def chat_completions(request):
        body = await read_body(request, max_body_bytes)
        messages = parse_messages(body)
        ids = checked_ids(lambda: model.encode_prompt(messages), "messages")
        job = Job(ids, parse_sampling(body, model, len(ids), "messages"), asyncio.get_running_loop())
        worker.submit(job)
        return await answer(request, body, job, chat=True)

    async def completions(request):
        body = await read_body(request, max_body_bytes)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string (one prompt per request)", "prompt")
        ids = checked_ids(lambda: model.tokenizer.encode(prompt), "prompt")
        job = Job(ids, parse_sampling(body, model, len(ids), "prompt"), asyncio.get_running_loop())
        worker.submit(job)
        return await answer(request, body, job, chat=False)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "hetero"}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request):
        if request.path_params["model"] != name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has {name!r}",
                           "model", "model_not_found")
        return JSONResponse(model_card())

    async def health(request):
        return JSONResponse({"status": "ok", "model": name, "busy": worker.running is not None,
                             "queued": worker.queued, "max_queue": worker.max_queue, **worker.counts})

    async def api_error(request, e: ApiError):
        return e.response({"Retry-After": "1"} if e.status == 429 else None)

    async def http_error(request, e: HTTPException):
        return ApiError(e.status_code, e.detail or "error", code={404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code)).response(getattr(e, "headers", None))

    async def server_error(request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.worker = worker
    return app


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port). Raises HeteroError if it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # IPv4 first: "localhost" then answers at 127.0.0.1, where most clients look
        family, kind, proto, _, addr = min(infos, key=lambda i: i[0] != socket.AF_INET)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise HeteroError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model, name: str, sock: socket.socket, max_queue: int = 8, quiet: bool = False, log_fn=print):
    """Serve until Ctrl-C on an already bound socket (see `bind`); `quiet` keeps only warnings."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        log_fn(f"warning: listening on {host}, not on loopback: anyone who can reach this machine can use the "
               "model (there is no authentication)")
    if not quiet:
        log_fn(f"serving {name} at http://{shown}:{port}/v1 (OpenAI API; {max_queue} requests may queue; Ctrl-C stops)")
    config = uvicorn.Config(create_app(model, name, max_queue), log_level="warning" if quiet else "info",
                            access_log=not quiet, timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    if not quiet:
        log_fn("server stopped")

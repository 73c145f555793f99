"""OpenAI-compatible HTTP server over an `LLMEngine`, standard library only.

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or SSE with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text format). One `EngineLoop` thread drives
`engine.step()`; each HTTP request runs in its own thread (ThreadingHTTPServer), queues its
request into the engine and waits on a per-request queue fed by the engine's output callback.

Invalid requests get a 4xx JSON error `{"error": {"message", "type", "param", "code"}}` and
never reach the engine: bad JSON (400), unknown model (404), prompt longer than the context
(400), bad sampling values such as negative max_tokens (400); a full waiting queue is
rejected with 503. A client that disconnects (mid-stream, or while waiting) aborts its
request, which frees its KV pages at once.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from comet_jax.engine.engine import LLMEngine, RequestOutput
from comet_jax.engine.sampling import SamplingParams

log = logging.getLogger("comet_jax.serving")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class EngineLoop:
    """Background thread stepping the engine while it has work; records a tokens/s window."""

    def __init__(self, engine: LLMEngine, window_s: float = 10.0):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._window_s = window_s
        self._history: collections.deque[tuple[float, int]] = collections.deque()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        self._wake.set()

    def tokens_per_second(self) -> float:
        h = self._history
        if len(h) < 2 or h[-1][0] <= h[0][0]:
            return 0.0
        return (h[-1][1] - h[0][1]) / (h[-1][0] - h[0][0])

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # keep serving: fail the in-flight requests, not the server
                self.errors += 1
                log.exception("engine step failed; aborting in-flight requests")
                for seq in list(self.engine.scheduler.running) + list(
                    self.engine.scheduler.waiting
                ):
                    self.engine.abort(seq.request_id)
            now = time.monotonic()
            self._history.append((now, self.engine.stats.generated_tokens))
            while self._history and now - self._history[0][0] > self._window_s:
                self._history.popleft()


def _get(body: dict, name: str, kind, default, *, check=None, expected: str = ""):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not default and (
        not isinstance(value, kind) or isinstance(value, bool) and kind is not bool
    ):
        raise ApiError(400, f"'{name}'={value!r}: expected {expected or kind.__name__}", name)
    if check is not None and value is not None and not check(value):
        raise ApiError(400, f"'{name}'={value!r}: expected {expected}", name)
    return value


class OpenAIServer:
    """Request handling independent of the socket layer (used by the HTTP handler)."""

    def __init__(
        self,
        engine: LLMEngine,
        tokenizer,
        model_name: str,
        *,
        max_waiting: int = 1024,
        request_timeout_s: float = 600.0,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self.loop = EngineLoop(engine)
        self.rejected = 0
        self.http_errors = 0

    # -- request parsing ---------------------------------------------------------------------------
    def sampling_params(self, body: dict) -> SamplingParams:
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"'stop'={stop!r}: expected a string or a list of strings", "stop")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(
                400, f"'max_tokens'={max_tokens!r}: expected an integer >= 1", "max_tokens"
            )
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"'n'={n!r}: only n=1 is supported", "n")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_get(
                body,
                "temperature",
                float,
                1.0,
                check=lambda v: 0 <= v <= 2,
                expected="a number in [0, 2]",
            ),
            top_p=_get(
                body, "top_p", float, 1.0, check=lambda v: 0 < v <= 1, expected="a number in (0, 1]"
            ),
            top_k=_get(body, "top_k", int, 0, check=lambda v: v >= 0, expected="an int >= 0"),
            seed=_get(body, "seed", int, None, check=lambda v: v >= 0, expected="an int >= 0"),
            stop=tuple(stop),
            ignore_eos=_get(body, "ignore_eos", bool, False),
        )

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise ApiError(
                    400,
                    "'messages': expected a non-empty list of {role, content} "
                    "objects with string values",
                    "messages",
                )
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError as e:
                raise ApiError(400, f"chat template: {e}", "messages") from e
            return self.tokenizer.encode(text)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return prompt
        raise ApiError(
            400,
            "'prompt': expected a string or a non-empty list of token ids (one prompt per request)",
            "prompt",
        )

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def submit(self, body: dict, chat: bool) -> tuple[str, list[int], queue.Queue]:
        """Validates and queues a request; returns (request id, prompt ids, output queue)."""
        self.check_model(body)
        params = self.sampling_params(body)
        ids = self.prompt_ids(body, chat)
        limit = self.engine.config.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise ApiError(
                400,
                f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} "
                f"exceeds the context length {limit}",
                "max_tokens",
                "context_length_exceeded",
            )
        if len(self.engine.scheduler.waiting) >= self.max_waiting:
            self.rejected += 1
            raise ApiError(503, f"server busy: {self.max_waiting} requests already waiting")
        outq: queue.Queue[RequestOutput] = queue.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            self.engine.add_request(rid, ids, params, outq.put)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        self.loop.notify()
        return rid, ids, outq

    # -- metrics -----------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        m = self.engine.metrics()
        m["generation_tokens_per_second"] = self.loop.tokens_per_second()
        m["requests_rejected_total"] = self.rejected
        m["http_errors_total"] = self.http_errors
        m["engine_step_errors_total"] = self.loop.errors
        lines = []
        for name, value in m.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE comet_{name} {kind}", f"comet_{name} {float(value):.6g}"]
        return "\n".join(lines) + "\n"


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed the connection (readable with EOF)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _make_handler(app: OpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "comet-jax"

        def log_message(self, fmt, *args):  # quiet by default; the access log is noise in tests
            log.debug("%s - " + fmt, self.address_string(), *args)

        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: ApiError) -> None:
            app.http_errors += 1
            self._send_json(err.status, err.body())

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/health":
                self._send_json(200, {"status": "ok"})
            elif path == "/v1/models":
                self._send_json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": app.model_name,
                                "object": "model",
                                "created": 0,
                                "owned_by": "comet-jax",
                            }
                        ],
                    },
                )
            elif path == "/metrics":
                data = app.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._error(ApiError(404, f"no route GET {path}"))

        def do_POST(self):
            path = self.path.split("?")[0]
            try:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if path not in ("/v1/completions", "/v1/chat/completions"):
                    raise ApiError(404, f"no route POST {path}")
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"request body is not valid JSON: {e}") from e
                if not isinstance(body, dict):
                    raise ApiError(400, "request body must be a JSON object")
                chat = path == "/v1/chat/completions"
                stream = _get(body, "stream", bool, False)
                rid, ids, outq = app.submit(body, chat)
            except ApiError as err:
                self._error(err)
                return
            if stream:
                self._stream(rid, ids, outq, chat)
            else:
                self._complete(rid, ids, outq, chat)

        def _wait(self, rid: str, outq: queue.Queue, deadline: float) -> RequestOutput | None:
            """Next output, or None after aborting (client gone or timeout)."""
            while True:
                try:
                    return outq.get(timeout=0.05)
                except queue.Empty:
                    if _client_gone(self.connection) or time.monotonic() > deadline:
                        app.engine.abort(rid)
                        self.close_connection = True
                        return None

        def _complete(self, rid, ids, outq, chat):
            deadline = time.monotonic() + app.request_timeout_s
            text, n_out, reason = [], 0, None
            while True:
                out = self._wait(rid, outq, deadline)
                if out is None:
                    return
                text.append(out.new_text)
                n_out = out.num_output_tokens
                if out.finished:
                    reason = out.finish_reason
                    break
            content = "".join(text)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reason,
                }
            else:
                choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
            self._send_json(
                200,
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": app.model_name,
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": len(ids),
                        "completion_tokens": n_out,
                        "total_tokens": len(ids) + n_out,
                    },
                },
            )

        def _stream(self, rid, ids, outq, chat):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            created = int(time.time())
            obj = "chat.completion.chunk" if chat else "text_completion"

            def event(payload) -> bool:
                try:
                    data = payload if isinstance(payload, str) else json.dumps(payload)
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()
                    return True
                except OSError:  # client went away: free its pages now
                    app.engine.abort(rid)
                    return False

            def chunk(text: str, reason, first: bool = False) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": text} if first else {"content": text}
                    choice = {"index": 0, "delta": delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
                return {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": app.model_name,
                    "choices": [choice],
                }

            if chat and not event(chunk("", None, first=True)):
                return
            deadline = time.monotonic() + app.request_timeout_s
            while True:
                out = self._wait(rid, outq, deadline)
                if out is None:
                    return
                if (out.new_text or out.finished) and not event(
                    chunk(out.new_text, out.finish_reason if out.finished else None)
                ):
                    return
                if out.finished:
                    break
            event("[DONE]")

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def serve(
    engine: LLMEngine,
    tokenizer,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_waiting: int = 1024,
    block: bool = True,
):
    """Starts the engine thread and the HTTP server. block=False returns (httpd, app) with the
    server running in a daemon thread (port 0 picks a free port: httpd.server_address)."""
    app = OpenAIServer(engine, tokenizer, model_name, max_waiting=max_waiting)
    app.loop.start()
    httpd = _Server((host, port), _make_handler(app))
    if not block:
        threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
        return httpd, app
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        app.loop.stop()
    return httpd, app

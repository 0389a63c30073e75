"""A scripted OpenAI-compatible ``/v1/chat/completions`` server on loopback, for the LLM tests.

Each request pops the next :class:`Script` from a queue and plays it: an HTTP error (with
headers such as ``Retry-After``), or an SSE stream of R1-style chunks (reasoning in
``reasoning_content`` / ``reasoning`` / ``<think>`` tags, then the answer, then a finish reason
and usage), optionally with pauses, or a stream that stalls while trickling keep-alive comments.
Every request body is recorded with its arrival time so tests can assert on prompts and timing.

    with FakeOpenAI() as srv:
        srv.push(Script.answer("```python\\n...\\n```", reasoning="...", reasoning_field="reasoning_content"))
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    """What the server does for one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error_body: dict[str, Any] | None = None
    reasoning: str = ""
    reasoning_field: str | None = "reasoning_content"  # "reasoning_content" | "reasoning" | None (inline)
    content: str = ""
    finish_reason: str | None = "stop"
    chunk_chars: int = 64
    delay_s: float = 0.0  # pause between chunks
    stall_after_chunks: int | None = None  # then trickle keep-alives until the client hangs up
    stall_max_s: float = 30.0
    usage: dict[str, Any] | None = None

    @classmethod
    def answer(cls, content: str, reasoning: str = "thinking about tiles...", **kw) -> "Script":
        return cls(content=content, reasoning=reasoning, **kw)

    @classmethod
    def error(cls, status: int, retry_after: float | None = None, message: str = "rate limited") -> "Script":
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        return cls(status=status, headers=headers,
                   error_body={"error": {"message": message, "type": "rate_limit", "code": status}})


@dataclass
class Recorded:
    body: dict[str, Any]
    t: float  # time.monotonic() at arrival
    headers: dict[str, str]  # lower-cased names

    @property
    def prompt(self) -> str:
        return "\n".join(m.get("content", "") for m in self.body.get("messages", []) if m.get("role") == "user")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client closing an idle keep-alive connection (or a stream it cut) is normal here
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FakeOpenAI:
    """Start with ``with FakeOpenAI() as srv`` (or :meth:`start` / :meth:`stop`)."""

    def __init__(self, model: str = "deepseek-ai/deepseek-r1"):
        self.model = model
        self.scripts: "queue.Queue[Script]" = queue.Queue()
        self.requests: list[Recorded] = []
        self.disconnects = 0  # streams the client hung up on
        self.active = 0  # streams being served now
        self.max_active = 0  # most streams served at once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control
    def push(self, *scripts: Script) -> None:
        for s in scripts:
            self.scripts.put(s)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        handler = _make_handler(self)
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None, usage=None) -> bytes:
    obj: dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        obj = {**obj, "choices": [], "usage": usage}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _pieces(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)] if text else []


def _make_handler(srv: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def do_POST(self):  # noqa: N802 - http.server's naming
            t = time.monotonic()
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = {"_raw": raw.decode(errors="replace")}
            srv._record(Recorded(body=body, t=t, headers={k.lower(): v for k, v in self.headers.items()}))
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            try:
                script = srv.scripts.get_nowait()
            except queue.Empty:
                return self._json(500, {"error": {"message": "fake server: no scripted response left"}},
                                  {"x-should-retry": "false"})
            if script.status != 200:
                return self._json(script.status, script.error_body or {"error": {"message": "error"}},
                                  script.headers)
            with srv._lock:
                srv.active += 1
                srv.max_active = max(srv.max_active, srv.active)
            try:
                self._stream(script, body)
            except (BrokenPipeError, ConnectionResetError):
                with srv._lock:
                    srv.disconnects += 1
            finally:
                with srv._lock:
                    srv.active -= 1

        def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _send(self, data: bytes) -> None:
            # chunked transfer encoding, one HTTP chunk per SSE event
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, s: Script, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            model = body.get("model", srv.model)
            events: list[bytes] = [_chunk(model, {"role": "assistant", "content": ""})]
            if s.reasoning_field:
                events += [_chunk(model, {s.reasoning_field: p, "content": None})
                           for p in _pieces(s.reasoning, s.chunk_chars)]
                content = s.content
            else:  # inline: R1's template pre-fills "<think>", so the stream starts mid-reasoning
                content = (s.reasoning + "\n</think>\n\n" + s.content) if s.reasoning else s.content
            events += [_chunk(model, {"content": p}) for p in _pieces(content, s.chunk_chars)]
            for i, ev in enumerate(events):
                if s.stall_after_chunks is not None and i >= s.stall_after_chunks:
                    self._stall(s)
                    return
                self._send(ev)
                if s.delay_s:
                    time.sleep(s.delay_s)
            self._send(_chunk(model, {}, s.finish_reason))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = s.usage or {
                    "prompt_tokens": len(json.dumps(body.get("messages", []))) // 4,
                    "completion_tokens": (len(s.reasoning) + len(s.content)) // 4,
                    "total_tokens": (len(json.dumps(body.get("messages", []))) + len(s.reasoning)
                                     + len(s.content)) // 4,
                    "completion_tokens_details": {"reasoning_tokens": len(s.reasoning) // 4},
                }
                self._send(_chunk(model, {}, None, usage=usage))
            self._send(b"data: [DONE]\n\n")
            self._send(b"")  # zero-length chunk ends the body

        def _stall(self, s: Script) -> None:
            """Trickle SSE comment lines (valid keep-alives that carry no data) so a per-read
            timeout never fires; only a wall-clock deadline on the client ends this."""
            t_end = time.monotonic() + s.stall_max_s
            while time.monotonic() < t_end and not srv._stop.is_set():
                self._send(b": keep-alive\n\n")
                time.sleep(0.1)
            self.close_connection = True

    return Handler

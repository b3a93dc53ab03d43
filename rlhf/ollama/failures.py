"""What can go wrong asking Ollama, as one short tag each, and the checks that assign the tags.

Failure tags (`OllamaResult.error`):
  unreachable      no connection: refused, no route, or none within `timeout` (the host is marked down)
  connection       the connection broke mid-request (retried)
  timeout          no answer within `timeout` seconds (retried)
  http_5xx         the server answered 5xx (retried); http_429 likewise
  model_not_found  404: the model is not pulled on that host (not retried)
  http_4xx         any other client error (not retried)
  not_json         the content held no JSON object (retried at once: models are not always consistent)
  schema           a JSON object that misses the schema or that `validate` rejected (retried at once)
RETRYABLE and CONTENT_FAULTS below say which tags are retried and which without a backoff;
`rlhf.ollama.pool` does the retrying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RETRYABLE = {"unreachable", "connection", "timeout", "http_5xx", "http_429", "not_json", "schema"}
CONTENT_FAULTS = {"not_json", "schema"}  # retried at once; transport faults back off exponentially
SNIPPET_CHARS = 100  # of a foreign server's body in an error line: enough to recognise it, never a whole page


@dataclass
class OllamaResult:
    ok: bool
    data: dict | None  # parsed JSON object when ok
    text: str  # raw content returned ("" on transport failure)
    error: str | None  # short reason tag when not ok (see the module docstring)
    host: str | None = None
    cached: bool = False
    detail: str = ""  # a transport failure in a few words ("connection refused"), for the down-host line


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """`text` on one line, cut to `limit` characters: what an error line may quote of a server's answer."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def foreign_answer(status: int, body: str) -> bool:
    """Whether an HTTP error's body shows that the server is not Ollama. Ollama's errors are JSON
    (`{"error": "model 'x' not found"}`, which the client unpacks to its message); a web page, or a 404
    for /api/show that does not speak of a model, comes from some other server."""
    text = str(body).lstrip().lower()
    return text.startswith("<") or (status == 404 and "model" not in text)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


def schema_problem(obj: Any, schema: dict) -> str | None:
    """A light check of the subset of JSON schema we send (type, required, properties, enum, maxLength)."""
    tp = schema.get("type")
    if isinstance(tp, str) and tp in _JSON_TYPES:
        ok = isinstance(obj, _JSON_TYPES[tp]) and not (tp in ("integer", "number") and isinstance(obj, bool))
        if not ok:
            return f"expected {tp}, got {type(obj).__name__}"
    if "enum" in schema and obj not in schema["enum"]:
        return f"{obj!r} not in {schema['enum']}"
    if isinstance(obj, str) and len(obj) > schema.get("maxLength", len(obj)):
        return f"longer than {schema['maxLength']} characters"
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                return f"missing key {key!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in obj and isinstance(sub, dict):
                problem = schema_problem(obj[key], sub)
                if problem:
                    return f"{key}: {problem}"
    return None


def transport_tag(e: BaseException) -> str:
    """The tag of an exception the client raised while asking (see the module docstring)."""
    import httpx
    import ollama

    if isinstance(e, ollama.ResponseError):
        code = e.status_code
        if code == 404:
            return "model_not_found"
        if code == 429:
            return "http_429"
        return "http_5xx" if code >= 500 else "http_4xx"
    if isinstance(e, httpx.ConnectTimeout):  # no connection at all: as dead as a refusal
        return "unreachable"
    if isinstance(e, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionError | httpx.ConnectError):
        return "unreachable"
    return "connection"  # resets, broken streams, protocol errors: transient


def transport_detail(e: BaseException, timeout: float) -> str:
    """A failed connection in a few words. The client raises its own ConnectionError with a
    generic message, from None; the socket's reason is kept on the context."""
    import httpx

    if isinstance(e, httpx.ConnectTimeout):
        return f"no connection within {timeout:g} s"
    inner = e.__context__ if isinstance(e, ConnectionError) and e.__context__ is not None else e
    text = snippet(str(inner) or type(inner).__name__, 60)
    return f"cannot connect: {text}"

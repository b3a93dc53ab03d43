"""Which Ollama servers to ask: `--ollama_host` / $OLLAMA_HOST as a list of URLs, and the check of
one host (reachable, an Ollama server, serving the model) with the fix when it fails."""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf.errors import UserError
from rlhf.ollama.failures import foreign_answer, snippet, transport_detail, transport_tag

DEFAULT_HOST = "http://127.0.0.1:11434"
NOT_OLLAMA_HINT = "is this an Ollama server? check --ollama_host"


def parse_hosts(hosts: str | list[str] | None) -> list[str]:
    """`None` -> $OLLAMA_HOST or the default; "h1,h2" -> two hosts; a bare host:port gets http://."""
    if hosts is None or hosts == "" or hosts == []:
        hosts = os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    items = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    out: list[str] = []
    for h in (x.strip() for x in items):
        if not h:
            continue
        if "://" not in h:
            h = "http://" + h
        out.append(h.rstrip("/"))
    if not out:
        raise UserError("no Ollama host given: pass --ollama_host http://HOST:11434 or set OLLAMA_HOST")
    return out


def host_problem(host: str, client: Any, model: str, timeout: float) -> tuple[str, str] | None:
    """None when `host` serves `model`; else (why, in a few words after the host; the whole line)."""
    import ollama

    try:
        client.show(model)
        return None
    except ollama.ResponseError as e:
        code, body = e.status_code, str(e.error)
        if foreign_answer(code, body):
            why = f"answered HTTP {code} ({snippet(body)!r}), not as Ollama does"
            return why, f"{host} {why}: {NOT_OLLAMA_HINT}"
        if code == 404:
            return (f"does not have model '{model}'",
                    f"Ollama at {host} does not have model '{model}': run `ollama pull {model}` "
                    "there (or pass --ollama_model)")
        why = f"answered HTTP {code} for model '{model}': {snippet(body)}"
        return why, f"Ollama at {host} {why}"
    except ConnectionError:
        return ("cannot be reached", f"cannot reach Ollama at {host}: start it with `ollama serve` or set "
                "OLLAMA_HOST (or --ollama_host) to a running server")
    except json.JSONDecodeError as e:  # a 2xx answer that is not JSON: some other web server
        why = f"answered HTTP 200 with {snippet(e.doc)!r}, not JSON as Ollama does"
        return why, f"{host} {why}: {NOT_OLLAMA_HINT}"
    except Exception as e:  # noqa: BLE001 - httpx timeouts and protocol errors
        tag = transport_tag(e)
        if tag == "unreachable":  # a connect timeout: nothing accepted the connection
            return (f"cannot be reached ({transport_detail(e, timeout)})",
                    f"cannot reach Ollama at {host} ({transport_detail(e, timeout)}): start it with `ollama serve` "
                    "or set OLLAMA_HOST (or --ollama_host) to a running server")
        if tag == "timeout":
            why = f"did not answer within {timeout:g} s"
            return why, (f"Ollama at {host} {why} (--timeout); check that it runs (`ollama serve`) and that "
                         "OLLAMA_HOST (or --ollama_host) is right")
        why = f"did not answer properly ({tag}: {type(e).__name__})"
        return why, f"Ollama at {host} {why}; check that it runs (`ollama serve`) and that OLLAMA_HOST is right"

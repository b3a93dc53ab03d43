"""The one Ollama client pool of the project: structured JSON answers, retries, disk cache, many hosts.

The data teacher, the PPO judge, the Gym judge and `rlhf eval` all go through `OllamaPool`, so they
share the same retry policy, cache and error messages. Only the official `ollama` Python client is used
(`ollama.Client(host=..., timeout=...)`, `chat(..., format=schema, options=..., stream=False)`).
What each failure tag means: `rlhf.ollama.failures`; which hosts and how each is checked: `rlhf.ollama.hosts`.

Transport faults are retried after `backoff * 2**attempt` seconds (at most 8 s), on the next host.

Dead hosts: `check()` skips a host that cannot be reached, lacks the model or is not an Ollama server,
with one line naming it and why, as long as another host serves the model (else one UserError names
every host). During a run, a host that refuses a connection is marked down at once, with one line, and
its requests go to the live hosts without a wait: a dead host then costs one failed connection, not a
backoff per request. The last live host is marked down only after a request used up its retries on it
(a lone Ollama that restarts is ridden over); from then on every request fails at once as
`unreachable`, so the caller stops promptly (see `all_down` and `down_text`). A host marked down stays
down for the pool's life (one stage run): a run restarted later asks it again. A host that answers
slowly (read timeout) is alive and is not marked down.

With `request_log`, every request, failed attempt and cache hit is also appended to that JSONL file
as it happens (see `read_request_log`), so the counts of a run that was killed are not lost.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rlhf.chips.advice import extract_json_object
from rlhf.data.writer import AppendWriter, recover_jsonl
from rlhf.errors import UserError
from rlhf.io import atomic_write_json
from rlhf.ollama.failures import (
    CONTENT_FAULTS,
    RETRYABLE,
    OllamaResult,
    schema_problem,
    transport_detail,
    transport_tag,
)
from rlhf.ollama.hosts import host_problem, parse_hosts
from rlhf.ollama.names import DEFAULT_MODEL

DEFAULT_OPTIONS: dict[str, Any] = {"temperature": 0, "seed": 0}
MAX_BACKOFF = 8.0


def cache_key(model: str, prompt: str, system: str | None, schema: dict, options: dict) -> str:
    blob = json.dumps({"model": model, "prompt": prompt, "system": system, "schema": schema, "options": options},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class OllamaPool:
    """Concurrent structured-output requests to one model served by one or more Ollama hosts."""

    def __init__(self, model: str = DEFAULT_MODEL, hosts: str | list[str] | None = None,
                 concurrency: int = 4, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 cache_dir: str | Path | None = None, options: dict | None = None,
                 request_log: str | Path | None = None) -> None:
        import ollama  # lazy: the rule teacher and `rlhf --help` do not need it

        self.model = model
        self.hosts = parse_hosts(hosts)
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.options = dict(DEFAULT_OPTIONS if options is None else options)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._clients = {h: ollama.Client(host=h, timeout=self.timeout) for h in self.hosts}
        self._next_host = itertools.count()
        self._lock = threading.Lock()
        # What happened, for manifests: HTTP chat requests, answers served from the cache,
        # failed attempts by tag (retried or not), final failures by tag, requests per host.
        self.requests = 0
        self.cache_hits = 0
        self.attempt_failures: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.per_host: Counter[str] = Counter()
        self.down: dict[str, str] = {}  # hosts left out (check) or marked down (a failed connection): why
        # The same events, one line each, written as they happen (under the lock, so lines from the
        # worker threads never interleave). The caller drops a torn tail before a pool appends to it;
        # the file is opened at the first event, so a pool that never asks leaves none.
        self._log_path = Path(request_log) if request_log else None
        self._log: AppendWriter | None = None

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, with the fix, when no host serves the model. Hosts that are down, lack the model
        or are no Ollama server are named in one line each and left out while another one serves it."""
        problems: dict[str, tuple[str, str]] = {}
        for host, client in self._clients.items():
            problem = host_problem(host, client, self.model, self.timeout)
            if problem is not None:
                problems[host] = problem
        live = [h for h in self.hosts if h not in problems]
        if not live:
            if len(problems) == 1:
                ((host, (_, message)),) = problems.items()
                raise UserError(message)
            listed = "; ".join(f"{h} {why}" for h, (why, _) in problems.items())
            whys = [why for why, _ in problems.values()]
            fixes = [fix for wanted, fix in (
                ("cannot be reached", "start Ollama there (`ollama serve`)"),
                ("does not have model", f"run `ollama pull {self.model}` there"),
                ("not as Ollama does", "make sure each is an Ollama server")) if any(wanted in w for w in whys)]
            raise UserError(f"no Ollama host serves model '{self.model}': {listed}; "
                            f"{', '.join(fixes)}{', or' if fixes else ''} fix --ollama_host")
        with self._lock:
            for host, (why, _) in problems.items():
                self.down[host] = why
                self._say(f"Ollama at {host} is left out: it {why}; using {', '.join(live)}")

    # -- dead hosts ---------------------------------------------------------------------------
    @staticmethod
    def _say(line: str) -> None:
        print(f"rlhf: warning: {line}", file=sys.stderr, flush=True)

    def live_hosts(self) -> list[str]:
        return [h for h in self.hosts if h not in self.down]

    def all_down(self) -> bool:
        return not self.live_hosts()

    def down_text(self) -> str:
        """'every Ollama host is down (h1: connection refused; h2: ...)', for the caller's stop line."""
        with self._lock:
            listed = "; ".join(f"{h}: {why}" for h, why in self.down.items())
        return f"every Ollama host is down ({listed}): start Ollama there (`ollama serve`) or fix --ollama_host"

    def _mark_down(self, host: str, why: str, last_resort: bool) -> bool:
        """Mark `host` down after a failed connection; True when the request can go on to a live host.
        The last live host is kept unless `last_resort` (its request used up its retries)."""
        with self._lock:
            if host not in self.down:
                others = [h for h in self.hosts if h not in self.down and h != host]
                if not others and not last_resort:
                    return False
                self.down[host] = why
                if others:  # the last host's fall is the caller's stop line, not a warning
                    self._say(f"Ollama at {host} is down ({why}); its requests go to {', '.join(others)}")
            return bool(self.live_hosts())

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits,
                "attempt_failures": dict(sorted(self.attempt_failures.items())),
                "failures": dict(sorted(self.failures.items())),
                "per_host": dict(sorted(self.per_host.items())), "down_hosts": dict(self.down)}

    def close(self) -> None:
        for client in self._clients.values():
            inner = getattr(client, "_client", None)
            if inner is not None:
                inner.close()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
            self._log_path = None  # closed: later events are not logged

    def _event(self, event: dict[str, Any]) -> None:
        """Append one event to the request log; the caller holds the lock."""
        if self._log_path is None:
            return
        if self._log is None:
            self._log = AppendWriter({"log": self._log_path})
        self._log.write("log", event)

    def flush_log(self) -> None:
        """fsync the request log: a kill loses nothing written to it, a power loss what is not flushed."""
        with self._lock:
            if self._log is not None:
                self._log.flush()

    # -- cache --------------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cache_get(self, key: str) -> dict | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # an unreadable entry is just a miss; it is rewritten atomically
        return entry if isinstance(entry, dict) and isinstance(entry.get("data"), dict) else None

    def _cache_put(self, key: str, text: str, data: dict) -> None:
        path = self._cache_path(key)
        if path is not None:
            atomic_write_json(path, {"model": self.model, "text": text, "data": data})

    # -- requests -----------------------------------------------------------------------------
    def _pick_host(self, attempt: int, start: int) -> str | None:
        """The host of this attempt, round robin over the live hosts; None when every one is down."""
        live = self.live_hosts()
        return live[(start + attempt) % len(live)] if live else None

    def _ask(self, send: Callable[[str], OllamaResult]) -> OllamaResult:
        """`send` on one host after another: retried with backoff on transient faults, at once on
        content faults and, without spending an attempt, on another host when one was just marked down."""
        with self._lock:
            start = next(self._next_host)
        result = OllamaResult(False, None, "", "unknown")
        attempt = 0
        while True:
            host = self._pick_host(attempt, start)
            if host is None:  # every host is down: fail at once, so the caller stops promptly
                result = OllamaResult(False, None, "", "unreachable", None, detail="every host is down")
                break
            result = send(host)
            if result.ok:
                return result
            with self._lock:
                self.attempt_failures[result.error or "unknown"] += 1
                self._event({"failure": result.error or "unknown", "host": host})
            if result.error == "unreachable" and self._mark_down(host, result.detail, last_resort=False):
                continue  # the request reached no server: another host takes it now
            if result.error not in RETRYABLE or attempt == self.retries:
                if result.error == "unreachable" and result.host is not None:
                    self._mark_down(result.host, result.detail, last_resort=True)
                break
            if result.error not in CONTENT_FAULTS:  # the server answered promptly: no need to back off
                time.sleep(min(MAX_BACKOFF, self.backoff * (2 ** attempt)))
            attempt += 1
        with self._lock:
            self.failures[result.error or "unknown"] += 1
        return result

    def _failed(self, e: BaseException, host: str) -> OllamaResult:
        tag = transport_tag(e)
        detail = transport_detail(e, self.timeout) if tag == "unreachable" else ""
        return OllamaResult(False, None, "", tag, host, detail=detail)

    def chat_json(self, prompt: str, schema: dict, validate: Callable[[dict], Any] | None = None,
                  system: str | None = None) -> OllamaResult:
        """Ask for a JSON object conforming to `schema`; retried with backoff on transient faults."""
        key = cache_key(self.model, prompt, system, schema, self.options)
        entry = self._cache_get(key)
        if entry is not None:
            try:
                if validate is not None:
                    validate(entry["data"])
                with self._lock:
                    self.cache_hits += 1
                    self._event({"cache_hit": True})
                return OllamaResult(True, entry["data"], str(entry.get("text", "")), None, None, cached=True)
            except Exception:  # noqa: BLE001 - this caller's validate rejects it: ask again
                pass
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        result = self._ask(lambda host: self._attempt(host, messages, schema, validate))
        if result.ok:
            self._cache_put(key, result.text, result.data or {})
        return result

    def _count_request(self, host: str) -> None:
        with self._lock:
            self.requests += 1
            self.per_host[host] += 1
            self._event({"request": host})  # before sending: a kill mid-request still counts it

    def _attempt(self, host: str, messages: list[dict], schema: dict,
                 validate: Callable[[dict], Any] | None) -> OllamaResult:
        self._count_request(host)
        try:
            resp = self._clients[host].chat(model=self.model, messages=messages, format=schema,
                                            options=self.options, stream=False)
        except Exception as e:  # noqa: BLE001 - classified into a tag; never escapes a worker thread
            return self._failed(e, host)
        text = resp.message.content or ""
        data = extract_json_object(text)
        if data is None:
            return OllamaResult(False, None, text, "not_json", host)
        if schema_problem(data, schema) is not None:
            return OllamaResult(False, None, text, "schema", host)
        if validate is not None:
            try:
                validate(data)
            except Exception:  # noqa: BLE001 - any rejection by the caller counts as schema
                return OllamaResult(False, None, text, "schema", host)
        return OllamaResult(True, data, text, None, host)

    def chat_text(self, messages: list[dict]) -> OllamaResult:
        """The model's own answer, unconstrained and uncached (evaluating a served model: its format
        is what is measured). Transport faults are retried like chat_json; the content is never."""
        def send(host: str) -> OllamaResult:
            self._count_request(host)
            try:
                resp = self._clients[host].chat(model=self.model, messages=messages, options=self.options,
                                                stream=False)
            except Exception as e:  # noqa: BLE001 - classified into a tag, as in _attempt
                return self._failed(e, host)
            return OllamaResult(True, None, resp.message.content or "", None, host)

        return self._ask(send)

    def chat_json_many(self, prompts: list[str], schema: dict, validate: Callable[[dict], Any] | None = None,
                       system: str | None = None, progress: bool = False) -> list[OllamaResult]:
        """`chat_json` over many prompts in threads (`concurrency` per host); order is preserved."""
        if not prompts:
            return []
        workers = min(len(prompts), self.concurrency * max(1, len(self.live_hosts())))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ollama") as pool:
            futures = [pool.submit(self.chat_json, p, schema, validate, system) for p in prompts]
            if progress:
                from concurrent.futures import as_completed

                from tqdm import tqdm

                for _ in tqdm(as_completed(futures), total=len(futures), desc=f"ollama {self.model}"):
                    pass
            results = [f.result() for f in futures]
        self.flush_log()
        return results


def read_request_log(path: str | Path) -> dict[str, Any]:
    """The counts of `OllamaPool.stats()` (less final failures) summed over a request log, torn tail dropped."""
    requests = cache_hits = 0
    attempt_failures: Counter[str] = Counter()
    per_host: Counter[str] = Counter()
    for event in recover_jsonl(path):
        if "request" in event:
            requests += 1
            per_host[str(event["request"])] += 1
        elif "failure" in event:
            attempt_failures[str(event["failure"])] += 1
        elif event.get("cache_hit"):
            cache_hits += 1
    return {"requests": requests, "cache_hits": cache_hits,
            "attempt_failures": dict(sorted(attempt_failures.items())), "per_host": dict(sorted(per_host.items()))}

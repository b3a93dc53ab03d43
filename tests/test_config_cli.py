"""The lead's config parsing and CLI, as a user meets them: `python -m rlhf ...` in a subprocess."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rlhf.config import build, field, help_text, parse
from rlhf.data.preference import PreferenceConfig
from rlhf.errors import UserError
from rlhf.stages import STAGES


def one_line_error(proc) -> str:
    """A user error: exit 2, exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rlhf: error: "), proc.stderr
    return proc.stderr


def test_help_lists_every_stage(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    for name, entry in STAGES.items():
        assert name in proc.stdout and entry[3] in proc.stdout
    assert cli().stdout == proc.stdout  # no arguments: the same help


def test_stage_help_lists_its_keys(cli):
    proc = cli("data", "preference", "--help")
    assert proc.returncode == 0
    for key in ("--output_dir", "--teacher", "--n", "--seed", "--ollama_host", "--sft_label_noise"):
        assert key in proc.stdout


def test_unknown_key_is_named_with_a_suggestion(cli, tmp_path):
    err = one_line_error(cli("data", "preference", "--nn", "5", "--output_dir", str(tmp_path)))
    assert "unknown key 'nn'" in err and "did you mean 'n'" in err


def test_wrong_type_names_the_key(cli, tmp_path):
    err = one_line_error(cli("data", "preference", "--n", "many", "--output_dir", str(tmp_path)))
    assert "'n'" in err and "expected an integer" in err and "'many'" in err
    err = one_line_error(cli("data", "preference", "--overwrite", "perhaps", "--output_dir", str(tmp_path)))
    assert "'overwrite'" in err and "true or false" in err


def test_missing_config_file_is_named(cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    err = one_line_error(cli("data", "preference", "--config", str(missing)))
    assert str(missing) in err and "not found" in err


def test_bad_yaml_and_unknown_yaml_key(cli, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("n: [1, 2\nseed: 3\n")
    err = one_line_error(cli("data", "preference", "--config", str(broken)))
    assert str(broken) in err and "YAML" in err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("n: 5\nteachr: rule\n")
    err = one_line_error(cli("data", "preference", "--config", str(unknown)))
    assert str(unknown) in err and "unknown key 'teachr'" in err and "teacher" in err


def test_unknown_stage_and_incomplete_group(cli):
    assert "unknown stage 'frobnicate'" in one_line_error(cli("frobnicate"))
    err = one_line_error(cli("data"))
    assert "preference" in err and "tabular" in err


def test_value_required(cli):
    assert "--n: a value is required" in one_line_error(cli("data", "preference", "--n"))


def test_yaml_then_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("n: 40\nseed: 3\nlanguage: zh\nrejection_weights: {off_topic: 1}\n")
    cfg = parse(PreferenceConfig, ["--config", str(config), "--seed", "9", "--ollama-host", "h:1", "--overwrite"],
                "data preference")
    assert (cfg.n, cfg.seed, cfg.language, cfg.ollama_host, cfg.overwrite) == (40, 9, "zh", "h:1", True)
    assert cfg.rejection_weights == {"off_topic": 1}


def test_pipeline_yaml_section_is_picked(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("seed: 5\npreference:\n  n: 12\n  teacher: rule\nsft:\n  epochs: 1\n")
    cfg = parse(PreferenceConfig, ["--config", str(config)], "data preference")
    assert (cfg.n, cfg.seed) == (12, 5)


def test_validate_runs_on_parse():
    with pytest.raises(UserError, match="--n must be a positive"):
        parse(PreferenceConfig, ["--n", "0"], "data preference")


def test_a_stage_runs_end_to_end_from_yaml(cli, tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "out"
    config.write_text(f"output_dir: {out}\nn: 10\nsft_n: 4\n")
    proc = cli("data", "preference", "--config", str(config), "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["rows"] == {"train": 9, "test": 1, "sft": 4}
    # the settings it ran with, YAML and command line together, usable again as --config
    recorded = out / "rlhf_config.yaml"
    assert parse(PreferenceConfig, ["--config", str(recorded)], "data preference") == parse(
        PreferenceConfig, ["--config", str(config), "--seed", "7"], "data preference")
    assert "seed: 7" in recorded.read_text()


@dataclass
class _Bounded:
    count: int = field(2, help="at least one", min=1)
    rate: float = field(0.5, help="a share", gt=0, max=1)
    sizes: list[int] = field([4, 4], help="each at least one", min=1)
    limit: float | None = field(None, help="optional, >= 0", min=0)
    anything: float = field(0.0, help="inf allowed", finite=False)
    need: float = field(1.0, help="a positive number", gt=0, why="it divides")


@pytest.mark.parametrize(("values", "message"), [
    ({"count": 0}, "t: --count 0: must be >= 1; e.g. --count 2 (the default)"),
    ({"rate": "0"}, "t: --rate 0.0: must be > 0 and <= 1; e.g. --rate 0.5 (the default)"),
    ({"rate": 1.5}, "--rate 1.5: must be > 0 and <= 1; e.g. --rate 0.5 (the default)"),
    ({"rate": "nan"}, "--rate nan: must be a finite number > 0 and <= 1; e.g. --rate 0.5 (the default)"),
    ({"sizes": "4,0"}, "--sizes 4,0: must be >= 1; e.g. --sizes 4,4 (the default)"),
    ({"limit": -1}, "--limit -1.0: must be >= 0; pass a finite number >= 0 or leave the key out"),
    ({"need": 0}, "--need 0.0: must be > 0 (it divides); e.g. --need 1.0 (the default)"),
])
def test_declared_constraints_are_checked_by_build(values, message):
    with pytest.raises(UserError) as err:
        build(_Bounded, values, "t")
    assert str(err.value) == (message if message.startswith("t: ") else f"t: {message}")


def test_values_inside_the_constraints_pass():
    cfg = build(_Bounded, {"count": 1, "rate": 1, "sizes": [1], "limit": None, "anything": "inf"}, "t")
    assert (cfg.count, cfg.rate, cfg.sizes, cfg.limit, cfg.anything) == (1, 1.0, [1], None, float("inf"))


def test_help_shows_the_constraints():
    text = help_text(_Bounded, "t", "doc")
    assert "--count int (default: 2; >= 1)" in text and "--rate float (default: 0.5; > 0 and <= 1)" in text


def test_dashed_and_keyword_keys_in_yaml_and_on_the_command_line(tmp_path):
    from rlhf.pipeline import PipelineConfig

    config = tmp_path / "p.yaml"
    config.write_text("from: ppo\nollama-host: h:1\n")
    cfg = parse(PipelineConfig, ["--config", str(config), "--output-dir", str(tmp_path / "run")], "pipeline")
    assert (cfg.from_, cfg.ollama_host, cfg.output_dir) == ("ppo", "h:1", str(tmp_path / "run"))
    assert parse(PipelineConfig, ["--from", "sft"], "pipeline").from_ == "sft"

"""The seed's tabular CSVs (`rlhf data tabular`) and the tabular action classifier (`rlhf tabular`)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from rlhf.chips import ACTIONS, ChipSpec, physics, rule_action
from rlhf.cli import main
from rlhf.data.tabular import DIMS_FILE, ENV_FILE, TabularDataConfig, read_dims_csv
from rlhf.data.tabular import run as run_data
from rlhf.errors import UserError
from rlhf.tabular.classifier import (
    META_FILE,
    MODEL_FILE,
    TabularClassifier,
    TabularTrainConfig,
    predict_action,
    run_train,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_dims_csv_is_seeded_and_labelled_by_the_rule_teacher(tmp_path: Path) -> None:
    m = run_data(TabularDataConfig(output_dir=str(tmp_path / "a"), variant="dims", n=200, seed=7))
    run_data(TabularDataConfig(output_dir=str(tmp_path / "b"), variant="dims", n=200, seed=7))
    run_data(TabularDataConfig(output_dir=str(tmp_path / "c"), variant="dims", n=200, seed=8))
    a = (tmp_path / "a" / DIMS_FILE).read_bytes()
    assert a == (tmp_path / "b" / DIMS_FILE).read_bytes()
    assert a != (tmp_path / "c" / DIMS_FILE).read_bytes()
    rows = _rows(tmp_path / "a" / DIMS_FILE)
    assert list(rows[0]) == ["length", "width", "height", "action"] and len(rows) == 200
    for r in rows:
        assert r["action"] == rule_action(ChipSpec(int(r["length"]), int(r["width"]), int(r["height"])))
    assert m["rows"] == 200 and sum(m["label_counts"].values()) == 200
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["label_counts"] == m["label_counts"]


def test_env_csv_follows_the_chip_model(tmp_path: Path) -> None:
    run_data(TabularDataConfig(output_dir=str(tmp_path), variant="env", n=50, seed=1))
    rows = _rows(tmp_path / ENV_FILE)
    assert list(rows[0]) == ["chip_id", "width_nm", "length_nm", "power_mw", "performance_score", "optimal_action"]
    for r in rows:
        w, ln = float(r["width_nm"]), float(r["length_nm"])
        assert float(r["power_mw"]) == pytest.approx(physics.power_mw(w, ln), abs=1e-3)
        assert float(r["performance_score"]) == pytest.approx(physics.performance_score(w, ln), abs=1e-3)
        assert int(r["optimal_action"]) == physics.optimal_action((w, ln))
        assert float(r["performance_score"]) < physics.TARGET_PERFORMANCE
    assert len({r["optimal_action"] for r in rows}) >= 3  # the starting chips need different moves


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tabular")
    run_data(TabularDataConfig(output_dir=str(root / "data"), variant="dims", n=400, seed=3))
    cfg = TabularTrainConfig(data=str(root / "data" / DIMS_FILE), output_dir=str(root / "model"),
                             n_estimators=30, seed=0)
    return root / "model", run_train(cfg)


def test_classifier_learns_the_rule_and_reports_held_out_accuracy(trained: tuple[Path, dict]) -> None:
    model_dir, metrics = trained
    assert metrics["test_rows"] == 80 and metrics["train_rows"] == 320
    assert metrics["accuracy"] > 0.9  # the label is a threshold on height: easy for trees
    assert set(metrics["report"]) >= set(ACTIONS) | {"accuracy"}
    assert json.loads((model_dir / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    clf = TabularClassifier.load(model_dir)
    for height, expected in ((5, "increase"), (50, "no_change"), (95, "decrease")):
        probs = clf.predict_proba(50, 50, height)
        assert sum(probs.values()) == pytest.approx(1.0) and set(probs) == set(ACTIONS)
        assert clf.predict_action(50, 50, height) == expected == max(probs, key=probs.get)
    assert predict_action(40, 60, 95, model_dir=model_dir) == "decrease"


def test_predict_cli_prints_action_and_probabilities(trained: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    model_dir, _ = trained
    assert main(["tabular", "predict", "--model_dir", str(model_dir), "--length", "10", "--width", "20",
                 "--height", "5"]) == 0
    out = capsys.readouterr().out
    assert "action: increase" in out and "no_change" in out and "probabilities" in out


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (MODEL_FILE, META_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_tampered_model_file_is_rejected(trained: tuple[Path, dict], tmp_path: Path) -> None:
    d = _copy_model(trained[0], tmp_path / "m")
    blob = bytearray((d / MODEL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum"):
        TabularClassifier.load(d)


def test_foreign_model_with_untrusted_types_is_rejected_even_with_a_matching_checksum(
        trained: tuple[Path, dict], tmp_path: Path) -> None:
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    d = _copy_model(trained[0], tmp_path / "m")
    blob = sio.dumps(FunctionTransformer(func=os.system))  # what an attacker would ship
    (d / MODEL_FILE).write_bytes(blob)
    meta = json.loads((d / META_FILE).read_text())
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trusted"):
        TabularClassifier.load(d)
    (d / MODEL_FILE).write_bytes(b"not a zip")
    meta["sha256"] = hashlib.sha256(b"not a zip").hexdigest()
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a readable skops model"):
        TabularClassifier.load(d)


@pytest.mark.parametrize("text, expected", [
    ("length,width,action\n1,2,increase\n", "missing column 'height'"),
    ("length,width,height,action\n1,2,3,increase\n4,x,6,decrease\n", "line 3, column 'width'"),
    ("length,width,height,action\n1,2,3,increase\n4,5,6,grow\n", "line 3, column 'action': unknown action 'grow'"),
])
def test_bad_csv_names_file_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=expected) as err:
        read_dims_csv(path, ACTIONS)
    assert str(path) in str(err.value)


def test_train_cli_exits_2_with_one_line_on_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("length,width,height,action\n1,2,3,increase\n4,5,,decrease\n")
    assert main(["tabular", "train", "--data", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "line 3" in err and "'height'" in err
    assert not (tmp_path / "out" / MODEL_FILE).exists()

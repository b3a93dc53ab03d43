"""The seed's tabular "reward model": a classifier `length, width, height -> action` on the dims CSV.

`rlhf tabular train --data CSV --output_dir DIR [--model random_forest|gradient_boosting]`
  StandardScaler + RandomForest(n_estimators=100, max_depth=10) as in the seed (or gradient
  boosting), a stratified held-out split, the classification report and accuracy printed and in
  DIR/metrics.json. The model is saved with skops (DIR/classifier.skops) beside DIR/classifier.json
  (labels, features, sha256 of the model file).
`rlhf tabular predict --model_dir DIR --length L --width W --height H`
  prints the action and the class probabilities.

Loading never unpickles: skops rebuilds only the types in TRUSTED_TYPES (plus the scikit-learn
and numpy types skops trusts itself), and the file must match the sha256 written at training, so
a tampered or foreign file fails with a UserError instead of running code.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.chips import ACTIONS
from rlhf.config import SEED, field
from rlhf.data.tabular import read_dims_csv
from rlhf.errors import UserError
from rlhf.io import atomic_write_json, write_metrics

MODEL_FILE = "classifier.skops"
META_FILE = "classifier.json"
FEATURES = ("length", "width", "height")
# Types skops does not trust by default that our pipelines contain (the trees' C structure).
TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


@dataclass
class TabularTrainConfig:
    data: str = field("runs/tabular/chip_dimension_reward_dataset.csv",
                      help="dims CSV with length,width,height,action (from `rlhf data tabular --variant dims`)")
    output_dir: str = field("runs/tabular_model", help="folder for the classifier and metrics.json")
    model: Literal["random_forest", "gradient_boosting"] = field("random_forest", help="classifier type")
    test_size: float = field(0.2, help="held-out fraction for the report (the seed used 0.2)", gt=0, lt=1)
    n_estimators: int = field(100, help="trees (the seed used 100)", min=1)
    max_depth: int = field(10, help="tree depth for random_forest (the seed used 10); gradient boosting uses 3", min=1)
    seed: int = field(42, help="split and model seed (the seed used 42)", **SEED)


@dataclass
class TabularPredictConfig:
    model_dir: str = field(help="folder written by `rlhf tabular train`")
    length: float = field(help="chip length (mm)", gt=0)
    width: float = field(help="chip width (mm)", gt=0)
    height: float = field(help="chip height (mm)", gt=0)
    output_dir: str = field("", help="if set, also write the prediction to OUTPUT_DIR/metrics.json")
    seed: int = field(0, help="unused (prediction is deterministic); kept for the stage convention", **SEED)


def _build(cfg: TabularTrainConfig) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg.model == "random_forest":
        model = RandomForestClassifier(n_estimators=cfg.n_estimators, max_depth=cfg.max_depth,
                                       random_state=cfg.seed, n_jobs=1)
    else:
        model = GradientBoostingClassifier(n_estimators=cfg.n_estimators, random_state=cfg.seed)
    # Scaler and model travel together, so prediction cannot use a mismatched scaler.
    return Pipeline([("scaler", StandardScaler()), ("model", model)])


def run_train(cfg: TabularTrainConfig) -> dict[str, Any]:
    import numpy as np
    import skops.io as sio
    from sklearn.metrics import accuracy_score, classification_report
    from sklearn.model_selection import train_test_split

    xs, ys = read_dims_csv(cfg.data, ACTIONS)
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys)
    counts = {a: int((y == a).sum()) for a in ACTIONS}
    # Stratify when every class can appear on both sides; tiny or one-class files still train.
    stratify = y if min(c for c in counts.values() if c) >= 2 and len(set(ys)) > 1 else None
    n_test = max(1, round(len(ys) * cfg.test_size))
    if len(ys) - n_test < 1:
        raise UserError(f"{cfg.data}: {len(ys)} rows are too few for a held-out split of {cfg.test_size}")
    if stratify is not None and n_test < len(set(ys)):
        stratify = None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, random_state=cfg.seed, stratify=stratify)

    pipe = _build(cfg)
    t0 = time.perf_counter()
    pipe.fit(x_tr, y_tr)
    train_seconds = time.perf_counter() - t0
    y_pred = pipe.predict(x_te)
    labels = [a for a in ACTIONS if a in set(ys)]
    report_text = classification_report(y_te, y_pred, labels=labels, zero_division=0)
    report = classification_report(y_te, y_pred, labels=labels, zero_division=0, output_dict=True)
    accuracy = float(accuracy_score(y_te, y_pred))
    print(report_text)
    print(f"accuracy: {accuracy:.2%} on {len(y_te)} held-out rows")

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = sio.dumps(pipe)
    tmp = out / f".{MODEL_FILE}.tmp"
    tmp.write_bytes(blob)
    tmp.replace(out / MODEL_FILE)  # atomic: a reader sees the old or the new model, never half
    atomic_write_json(out / META_FILE, {
        "format": "rlhf-tabular-classifier/1", "model": cfg.model, "features": list(FEATURES),
        "classes": [str(c) for c in pipe.classes_], "sha256": hashlib.sha256(blob).hexdigest(),
        "trusted_types": TRUSTED_TYPES, "data": str(cfg.data),
    })
    metrics = {"model": cfg.model, "accuracy": accuracy, "report": report, "rows": len(ys),
               "train_rows": len(y_tr), "test_rows": len(y_te), "label_counts": counts,
               "train_seconds": round(train_seconds, 3), "seed": cfg.seed}
    write_metrics(out, metrics)
    return metrics


class TabularClassifier:
    """A loaded classifier; `predict_action(length, width, height)` as in the seed."""

    def __init__(self, pipeline: Any, classes: list[str]) -> None:
        self.pipeline = pipeline
        self.classes = classes

    @classmethod
    def load(cls, model_dir: str | Path) -> TabularClassifier:
        import skops.io as sio
        from skops.io.exceptions import UntrustedTypesFoundException

        model_dir = Path(model_dir)
        meta_path, model_path = model_dir / META_FILE, model_dir / MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise UserError(f"{model_dir}: no classifier here (expected {META_FILE} and {MODEL_FILE}; "
                            "train one with `rlhf tabular train`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path}: not valid JSON; retrain with `rlhf tabular train`") from None
        if not isinstance(meta, dict) or meta.get("format") != "rlhf-tabular-classifier/1":
            raise UserError(f"{meta_path}: not a classifier written by `rlhf tabular train`")
        blob = model_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise UserError(f"{model_path}: checksum differs from {META_FILE}: the file was modified or replaced; "
                            "refusing to load it (retrain with `rlhf tabular train`)")
        try:
            pipe = sio.load(io.BytesIO(blob), trusted=TRUSTED_TYPES)
        except UntrustedTypesFoundException as e:
            raise UserError(f"{model_path}: contains types outside the trusted list ({e}); "
                            "refusing to load it") from None
        except Exception as e:  # noqa: BLE001 - corrupt zip, wrong schema: all mean "not our model"
            raise UserError(f"{model_path}: not a readable skops model ({type(e).__name__}); "
                            "retrain with `rlhf tabular train`") from None
        classes = [str(c) for c in getattr(pipe, "classes_", [])]
        if not hasattr(pipe, "predict_proba") or classes != meta.get("classes") or not set(classes) <= set(ACTIONS):
            raise UserError(f"{model_path}: the model does not predict the actions {', '.join(ACTIONS)}")
        return cls(pipe, classes)

    def predict_proba(self, length: float, width: float, height: float) -> dict[str, float]:
        """Probability of each action (all of ACTIONS; 0 for a class absent from training)."""
        import numpy as np

        p = self.pipeline.predict_proba(np.array([[length, width, height]], dtype=np.float64))[0]
        probs = {a: 0.0 for a in ACTIONS}
        probs.update({c: float(v) for c, v in zip(self.classes, p)})
        return probs

    def predict_action(self, length: float, width: float, height: float) -> str:
        """"increase" | "decrease" | "no_change"."""
        probs = self.predict_proba(length, width, height)
        return max(ACTIONS, key=lambda a: (probs[a], -ACTIONS.index(a)))


_LOADED: dict[str, TabularClassifier] = {}


def predict_action(length: float, width: float, height: float, model_dir: str | Path) -> str:
    """The seed's `predict_action`, with the model folder made explicit (loaded once, then reused)."""
    return _classifier(model_dir).predict_action(length, width, height)


def predict_proba(length: float, width: float, height: float, model_dir: str | Path) -> dict[str, float]:
    return _classifier(model_dir).predict_proba(length, width, height)


def _classifier(model_dir: str | Path) -> TabularClassifier:
    key = str(Path(model_dir).resolve())
    if key not in _LOADED:
        _LOADED[key] = TabularClassifier.load(model_dir)
    return _LOADED[key]


def run_predict(cfg: TabularPredictConfig) -> dict[str, Any]:
    clf = TabularClassifier.load(cfg.model_dir)
    probs = clf.predict_proba(cfg.length, cfg.width, cfg.height)
    action = clf.predict_action(cfg.length, cfg.width, cfg.height)
    print(f"action: {action}")
    print("probabilities: " + ", ".join(f"{a} {probs[a]:.3f}" for a in ACTIONS))
    result = {"input": {"length": cfg.length, "width": cfg.width, "height": cfg.height},
              "action": action, "probabilities": probs}
    if cfg.output_dir:
        write_metrics(cfg.output_dir, result)
    return result

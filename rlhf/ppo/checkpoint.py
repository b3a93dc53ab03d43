"""PPO's folders on disk: checkpoints (save, resume exactly, or start fresh) and the final policy/ and value/.

A checkpoint (checkpoints/update-NNNNNN/) holds what training changed (trainable weights or adapters),
both optimizers and schedulers, every process's RNG state (rng-R.pt) and state.json (update, KL
coefficient, world size, training settings). It is written to a scratch folder and renamed, so it
exists whole or not at all, and it is read with torch.load(weights_only=True) only.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.io import atomic_write_json, check_removable, mark_owned, read_jsonl, remove_owned_dir
from rlhf.models import make_adapter_relocatable
from rlhf.ppo.config import PPOConfig

FRESH = "--resume false (or --overwrite true) to start over in this folder, or use a new --output_dir"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and tuples only: what torch.load(weights_only=True) reads
    back without unpickling any object (numpy's key array travels as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.random.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def load_checkpoint_file(path: Path, device: Any = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only. A file that needs any
    other object unpickled is refused before anything in it runs (a planted checkpoint in an output
    folder would otherwise execute code on resume)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused, not a checkpoint rlhf wrote (it asks to unpickle "
                        f"{str(err).splitlines()[0][:120]!r}); delete that checkpoint folder or use a new "
                        "--output_dir") from None


def check_same_settings(ck: Path, saved: dict[str, Any] | None, cfg: PPOConfig) -> None:
    """A resume continues the checkpoint's training, so its settings must be this run's: a new
    learning rate, KL coefficient, seed or batch would silently mix two trainings."""
    if saved is None:
        raise UserError(f"{ck}: the checkpoint does not record its settings, so resuming could mix two "
                        f"trainings; pass {FRESH}")
    now = json.loads(json.dumps(cfg.training_settings()))  # as state.json holds them
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if saved.get("lr_schedule") == now.get("lr_schedule") == "constant":
        # no step depends on where a constant schedule ends: more episodes continue the same run
        changed = [k for k in changed if not (k == "total_episodes" and now[k] > saved[k])]
    if changed:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"{ck}: this run's settings differ from the checkpoint's ({shown}{more}); rerun with "
                        f"the checkpoint's values to resume, or pass {FRESH}")


class Checkpoints:
    """The checkpoints of one output folder, for the processes of one run (`acc`: its Accelerator)."""

    def __init__(self, acc: Any, out: Path, cfg: PPOConfig) -> None:
        self.acc, self.out, self.cfg = acc, out, cfg
        self.root = out / "checkpoints"
        self._trainable: set[str] | None = None

    def dirs(self) -> list[Path]:
        """Finished checkpoints, oldest first (a folder counts once its state.json is written)."""
        root = self.root
        return sorted(p for p in root.glob("update-*") if (p / "state.json").is_file()) if root.is_dir() else []

    def save(self, update: int, model: nn.Module, optimizers: list[Any], schedulers: list[Any],
             kl_coef: float, local: dict[str, Any] | None = None) -> None:
        """Everything needed to continue exactly: weights/adapters, optimizer, scheduler, RNG, position,
        and `local`, this process's own state (plain containers only), returned by `resume`."""
        acc, rank = self.acc, self.acc.process_index
        acc.wait_for_everyone()
        final = self.root / f"update-{update:06d}"
        tmp = self.root / f".tmp-update-{update:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"model": {k: v for k, v in model.state_dict().items() if self._is_trainable(model, k)},
                        "optimizers": [opt.state_dict() for opt in optimizers],
                        "schedulers": [sch.state_dict() for sch in schedulers]},
                       tmp / "trainer.pt")
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        torch.save(local or {}, tmp / f"local-{rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "state.json", {"update": update, "kl_coef": kl_coef,
                                                   "world_size": acc.num_processes,
                                                   "settings": self.cfg.training_settings()})
            os.replace(tmp, final)  # a checkpoint exists whole or not at all
            for old in self.dirs()[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _is_trainable(self, model: nn.Module, key: str) -> bool:
        """Checkpoints hold what training changes; frozen base weights are reloaded from the model."""
        if self._trainable is None:
            self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return key in self._trainable

    def resume(self, model: nn.Module, optimizers: list[Any], schedulers: list[Any],
               num_updates: int) -> tuple[int, float, dict[str, Any]] | None:
        """Restore the last checkpoint into the model, optimizers, schedulers and RNGs and return its
        (update, KL coefficient, this process's `local` state); None when this run starts fresh (the
        folder's old log and checkpoints are then removed)."""
        ckpts = self.dirs()
        if not (self.cfg.resume and ckpts) or self.cfg.overwrite:
            self.start_fresh()
            return None
        acc, world = self.acc, self.acc.num_processes
        ck = ckpts[-1]
        state = json.loads((ck / "state.json").read_text())
        if state.get("world_size", 1) != world:
            raise UserError(f"{ck}: written by {state.get('world_size')} processes, resumed with {world}; "
                            "resume with the same number or start a new --output_dir")
        check_same_settings(ck, state.get("settings"), self.cfg)
        blob = load_checkpoint_file(ck / "trainer.pt", acc.device)
        missing = model.load_state_dict(blob["model"], strict=False)
        if missing.unexpected_keys:
            raise UserError(f"{ck}: checkpoint does not match this model ({missing.unexpected_keys[0]}); "
                            "use a new --output_dir or the config it was written with")
        if "optimizers" not in blob:
            raise UserError(f"{ck}: the checkpoint holds one optimizer for both models, this trainer one per "
                            "model; start a new --output_dir")
        for opt, sd in zip(optimizers, blob["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for sch, sd in zip(schedulers, blob["schedulers"], strict=True):
            sch.load_state_dict(sd)
        set_rng_state(load_checkpoint_file(ck / f"rng-{acc.process_index}.pt"))
        local_file = ck / f"local-{acc.process_index}.pt"
        local = load_checkpoint_file(local_file) if local_file.is_file() else {}
        update = state["update"]
        log = self.out / "metrics.jsonl"
        if acc.is_main_process and log.exists():  # drop rows logged after the checkpoint
            rows = [r for r in read_jsonl(log, tolerate_torn_tail=True) if r.get("update", 0) <= update]
            tmp = log.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, log)
        print(f"resuming from {ck} (update {update} of {num_updates})", flush=True)
        return update, state["kl_coef"], local

    def start_fresh(self) -> None:
        """A run that does not resume starts its own metrics.jsonl and checkpoints: an earlier run's
        rows would be read as this one's, and its checkpoints block this run's of the same number."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            for old in self.dirs():  # update-N folders with a state.json: only rlhf writes those
                shutil.rmtree(old)
        self.acc.wait_for_everyone()


def check_output_folders(out: Path, overwrite: bool) -> None:
    """policy/ and value/ will be replaced, so they must be rlhf's (or absent), unless `overwrite`."""
    for name in ("policy", "value"):
        check_removable(out / name, force=overwrite)


def save_outputs(out: Path, model: nn.Module, tok: Any, overwrite: bool) -> None:
    """policy/ (with the tokenizer) and value/ of a PolicyAndValue, each replaced whole or not at all."""
    for name, part in (("policy", model.policy), ("value", model.value)):
        target, tmp = out / name, out / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)  # our own scratch name, from a run killed while saving
        part.save_pretrained(tmp)
        if name == "policy":
            tok.save_pretrained(tmp)
        mark_owned(tmp)
        remove_owned_dir(target, force=overwrite)
        os.replace(tmp, target)  # the folder exists whole or not at all
        make_adapter_relocatable(target)

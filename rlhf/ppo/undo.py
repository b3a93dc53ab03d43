"""Undoing one optimizer step: the policy's weights and Adam state from before it, put back.

`early_stop_log_ratio` stops the policy's steps once a token has moved past the bound, but the step
that carried it there is already taken: on the tiny bench one Adam step moved a token 2.3 nats under
a bound of 1.5 (and the next rollout's KL went 0.6 -> 8.4). With `undo_step_past_bound` the trainer
saves this state before each policy step and restores it when the step crossed the bound, so the
update ends at its last step within it.
"""

from __future__ import annotations

from typing import Any

import torch


class StepUndo:
    """The parameters and their optimizer state as they were before the last `save()`."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: Any) -> None:
        self.params = params
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's
        self._weights: list[torch.Tensor] = []
        self._state: list[dict[str, Any]] = []

    @property
    def saved(self) -> bool:
        return bool(self._weights)

    @torch.no_grad()
    def save(self) -> None:
        """Copy the weights and the optimizer's per-parameter state (AdamW: step, both moments)."""
        self._weights = [p.detach().clone() for p in self.params]
        self._state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                       for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what `save()` copied (once: the copy is then dropped)."""
        for p, w, state in zip(self.params, self._weights, self._state, strict=True):
            p.copy_(w)
            if state:
                self.optimizer.state[p] = state
            else:  # saved before the optimizer's first step: it had no state yet
                self.optimizer.state.pop(p, None)
        self.clear()

    def clear(self) -> None:
        self._weights, self._state = [], []

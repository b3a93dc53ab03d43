"""Our PPO for language models: pure math in `core`, sampling in `rollout`, the loop in `trainer`."""

"""Our PPO for language models: the math in `core`, steps 1-4 of an update in `rollout`, the models in
`models`, the value model's second thread in `parallel`, checkpoints and outputs in `checkpoint`, the
logged numbers in `metrics`, the loop in `trainer`."""

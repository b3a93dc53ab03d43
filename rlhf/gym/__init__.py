"""The seed's tabular track: the chip environment (gymnasium), its judges, the tabular action
classifier and stable-baselines3 PPO training. Submodules import their heavy dependencies lazily."""

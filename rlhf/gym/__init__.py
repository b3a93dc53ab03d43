"""The seed's Gym track: the chip environment (gymnasium), its judges and stable-baselines3 PPO
training. Submodules import their heavy dependencies lazily."""

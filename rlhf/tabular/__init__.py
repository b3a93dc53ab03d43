"""The seed's tabular "reward model": an action classifier on chip dimensions (`rlhf tabular train`,
`rlhf tabular predict`), trained on the dims CSV that `rlhf data tabular` writes."""

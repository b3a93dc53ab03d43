"""`rlhf tabular train` as a script: `python|torchrun|accelerate launch scripts/tabular_train.py --config FILE.yaml`."""

from rlhf.cli import script_main

if __name__ == "__main__":
    script_main("tabular train")

"""`rlhf data tabular` as a script: `python|torchrun|accelerate launch scripts/data_tabular.py --config FILE.yaml`."""

from rlhf.cli import script_main

if __name__ == "__main__":
    script_main("data tabular")

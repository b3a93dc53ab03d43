"""`rlhf score` as a script: `python|torchrun|accelerate launch scripts/score.py --config FILE.yaml`."""

from rlhf.cli import script_main

if __name__ == "__main__":
    script_main("score")

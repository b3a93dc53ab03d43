"""`rlhf data preference` as a script: `python|torchrun|accelerate launch scripts/data_preference.py ...`."""

from rlhf.cli import script_main

if __name__ == "__main__":
    script_main("data preference")

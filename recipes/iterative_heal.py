"""Iterative steer -> filter -> heal -> bake loop.

    python recipes/iterative_heal.py --config recipes/configs/demo.yaml [section.key=value ...]
    python recipes/iterative_heal.py --resume runs/<dir>
"""
import sys

from steer_heal.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

#!/usr/bin/env python
"""Evaluate original and converted models. `python python/evaluate.py --help`."""
import sys

from mha2mla.evaluate_cli import main

if __name__ == "__main__":
    sys.exit(main())

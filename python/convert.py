#!/usr/bin/env python
"""Convert a Llama-family model to MLA. `python python/convert.py --help`."""
import sys

from mha2mla.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Fine-tune a converted model. `python python/finetune.py --help`;
several GPUs: `torchrun --nproc_per_node N python/finetune.py ...`."""
import sys

from mha2mla.finetune_cli import main

if __name__ == "__main__":
    sys.exit(main())

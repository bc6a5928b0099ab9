import os
import sys

import torch

# Benchmarks import the harness as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton providers be smoke-tested on CPUs

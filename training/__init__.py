"""Training scripts of cdb-vq: `accelerate launch training/train.py ...` (see docs/training.md)."""

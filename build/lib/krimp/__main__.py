"""``python -m krimp ...`` (and ``torchrun --nproc-per-node 2 -m krimp compress ...``)."""

from krimp.cli.main import run

run()

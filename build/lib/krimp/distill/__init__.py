"""Knowledge distillation: students built from a teacher, and the ``distill`` recipe stage."""

from krimp.distill import method  # noqa: F401  (registers the `distill` stage)

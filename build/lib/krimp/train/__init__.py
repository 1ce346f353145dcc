"""Training loops krimp runs after compressing: recovery by distillation from the original model."""

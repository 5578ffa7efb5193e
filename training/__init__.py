"""DiDE training: data, the ViLT teacher, the dual-encoder student, losses and the training CLI."""

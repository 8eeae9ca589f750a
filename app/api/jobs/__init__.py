"""Jobs: submit, list, cancel, and read back metrics and checkpoints."""

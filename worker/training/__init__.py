"""Pure PyTorch training: a spec and arrays in, epoch results out. No SQL, HTTP or Celery here."""

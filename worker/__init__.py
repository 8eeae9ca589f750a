"""trainsvc worker: Celery tasks and the PyTorch trainer. The only package that imports torch."""

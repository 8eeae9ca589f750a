"""Operations: Prometheus metrics, structured logs and `trainsvc doctor`'s checks."""

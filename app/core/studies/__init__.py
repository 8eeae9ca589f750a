"""Studies: grids of job specs, the statistics over their stored metrics, and their reports."""

"""Studies: grids of jobs over one base spec, their reports and plots."""

"""Flow matching: schedules and noising (flow.py), the Euler sampler (sampler.py)."""

"""Prefect flows: one per experiment phase, and the experiment flow that chains them."""

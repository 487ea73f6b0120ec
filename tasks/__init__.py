"""Prefect tasks: thin wrappers over guided_ab's core that add retries, logging and artifacts."""

"""Entry points: `python -m jobs.<name>`. Each parses options and calls pipeline.job."""

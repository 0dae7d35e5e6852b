"""Runnable recipes: `python -m tinsmith.recipes.<name> [key=value ...]`.

Each recipe trains against an embedded Tinsmith (or `base_url=...`, any server that speaks
the Tinker API) through the official SDK, writes metrics and checkpoints to `log_path`, and
resumes from there when run again.
"""

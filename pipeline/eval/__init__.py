"""Answer-quality evaluation for code: held-out tasks (tasks.py) and how answers are scored (scoring.py)."""

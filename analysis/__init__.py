"""Paper figures and tables from run records (docs/DESIGN.md, "Records").

records: run folders / W&B / memory CSV -> pandas DataFrames.
figures: DataFrames -> PNG + markdown, one function per paper figure or table.
render:  executes analysis/notebooks/*.ipynb on a sweep folder (CLI `wetok-analyze`).
"""

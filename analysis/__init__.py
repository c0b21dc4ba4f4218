"""Paper figures and tables from run records (docs/DESIGN.md, "Records").

registry:      each paper figure/table declared once (sweep, title, axes, metrics, grouping).
record_reader: run folders / memory CSV -> pandas DataFrames (format: wetok.record_schema);
wandb_reader:  the same columns from the W&B mirror.
tables, plots: generic markdown tables and plots of those frames; spread: seeds and baselines.
paper:         the reports, built from the registry: PNG + markdown per figure or table.
render:        the CLI `wetok-analyze` (python -m analysis.render), straight from the registry.
notebook_view: analysis/notebooks/*.ipynb, a view that calls paper.report by name.
"""

"""The workflow on top of everything: the pipeline (stages in order, with the baseline, its cache
and the control), search, reports and charts, the docs generator and the CLI."""

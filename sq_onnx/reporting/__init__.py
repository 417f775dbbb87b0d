"""The conversion report: per-group smoothing records, per-layer errors read back from the saved graph, HTML and plots."""

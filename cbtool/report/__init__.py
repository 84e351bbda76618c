"""The HTML report: data gathering, rendering, plots and its CSS/JS assets (docs/report.md)."""

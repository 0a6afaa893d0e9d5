"""Run reports: report.md with training curves and evaluation figures (matplotlib, Agg)."""

from eval.report.build import write_report

__all__ = ["write_report"]

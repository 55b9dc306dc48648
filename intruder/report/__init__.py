"""The report wing: figures drawn from stored results (`plot`), and HTML and Markdown reports (`html`, with
the page blocks in `_pages`). It reads results and run directories; it never computes a decomposition itself,
and asks the analysis wing for one only when a report is given a training run.

    from intruder.report import write_report
    write_report(["runs/lora-r8"], "reports/lora-r8")
"""

from .html import write_report

__all__ = ["write_report"]

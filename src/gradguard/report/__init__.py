"""HTML reports: the report of a monitored run (``gradguard report RUN.jsonl``) and the charts every report
uses; the lab's own page is ``gradguard.lab.report``, beside the lab.

Each report is one self-contained page: plots are embedded as PNG data URIs (:mod:`.figures`).
"""

"""HTML reports: the lab's report and the report of a monitored run (``gradguard report RUN.jsonl``).

Each report is one self-contained page: plots are embedded as PNG data URIs (:mod:`.figures`).
"""

"""Reporting of an ``Analysis``: rich text (``text``), the stable JSON (``json_report``), and
self-contained HTML with matplotlib plots (``html``). Analysis code never prints; these do
nothing but format, and each imports its heavy library (rich, matplotlib) only when used.
"""

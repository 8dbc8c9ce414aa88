"""Side-by-side benchmarks: keytrio vs upstream Keylime 7.14.3 on the same inputs.

``gen`` makes the inputs once with a real swtpm (keytrio's venv); ``worker_keytrio`` and
``worker_upstream`` are long-lived processes (one per interpreter) that time calls on those inputs
and answer JSON lines on stdout; ``driver`` pins both to the same CPU, interleaves them A B A B and
writes the JSON report and the Markdown tables. Entry point: ``./scripts/bench [--quick]``.
"""

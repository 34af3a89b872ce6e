"""syncd's benchmark suite: numbers, not tests (targets in BENCHMARKS.md).

``python -m bench`` runs the quick profile of every measurement and prints one table;
``--full`` runs the long one. Each measurement also runs alone:

* ``python -m bench.ingest``: webhook acknowledgements per second and their latency;
* ``python -m bench.e2e``: webhook → invoice at the Xero emulator, beside a minimal
  baseline (``bench.baseline``), with syncd's memory and CPU per deal;
* ``python -m bench.budget``: share of Xero's (scaled) rate limit used, and 429s;
* ``python -m bench.monthstart``: every retainer client due at once on the 1st, under
  Xero's (scaled) limits, with batching off and on;
* ``python -m bench.backfill``: a full read of every deal through the list endpoint;
* ``python -m bench.poll``: an incremental poll finding a few changes among many deals.

Everything runs on 127.0.0.1 against the project's emulators; ``BENCHMARKS.md`` holds
the latest numbers and what each one means.
"""

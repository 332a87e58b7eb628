"""What the benchmarks (and the demo) share: `recipe` (the embedded MiniLM
model, the real tasks, seeded splits, encoding, the head-free classifier),
`timing` (interleaved timing, step timer, memory), `runs` (the run cache)
and `plots` (figures).

Scripts put `benchmarks/` on `sys.path` and import `from common import ...`;
nothing here imports Keras at import time except `timing`.
"""

"""Shared CPU building blocks that several op families run on: the fused-softmax check
(``fused``), the log-sum-exp merge (``merge``), the block-gather and key-major dispatch engines
(``gather``, ``dispatch``), the work-buffer allocator (``alloc``) and the compiled kernels
(``native``). Ops and backends import these; mechanisms never do."""

"""State stores: checkpoints, idempotency keys, the DLQ.

Protocols in `base`, one module per backend.
"""

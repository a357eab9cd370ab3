"""DLQ triage for `dlqtriage`: pattern analysis (pure), redrive (through the real pipeline)
and rendering, kept apart so the analysis is unit-testable without a store or a terminal."""

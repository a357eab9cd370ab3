"""The pipeline's own mechanisms (admission, retry, breaker, commit watermark) and the worker."""

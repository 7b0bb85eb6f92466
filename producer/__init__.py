"""The producer: source readers, batching, idempotent publishing with backpressure."""

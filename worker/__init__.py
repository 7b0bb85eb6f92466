"""The worker: consume loop, leases, tokenization, bucketing, device pipeline, writer, commit."""

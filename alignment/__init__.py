"""alignment — trainer-vs-rollout drift: metrics, the per-step check, the mismatch diagnostic."""

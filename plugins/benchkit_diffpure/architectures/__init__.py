"""Re-implemented score networks whose state-dict keys match the official DiffPure checkpoints."""

"""`llmx eval`: an engine (or a checkpoint, built to a temporary engine) scored on held-out text."""

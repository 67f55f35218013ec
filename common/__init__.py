"""Small helpers shared by every stage: user-facing errors, atomic output directories, content hashes."""

"""One training run per task kind: assembly (data + network + task), the Lightning trainer, the run record."""

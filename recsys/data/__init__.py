"""Data stage: reading, importing public formats, validation, synthetic logs, preparation."""

"""Bridges to other tools; each module imports its tool (an optional dependency) and is imported on demand."""

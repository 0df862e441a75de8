"""The papers' experiments as runnable code."""

__all__: list[str] = []

"""Reading a fitted posterior: joint draws of its sites, the ArviZ export and the collapse report.
Builds on inference."""

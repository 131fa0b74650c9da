"""Taking back what a failed or killed job left: the undo log's replay
(undo.py), the clean-up after a dead process (leftovers.py), and removing
this project's checkpoints and bitmaps (own_checkpoints.py)."""

"""The engine: copying disks (copy.py) and, later, running backup jobs."""

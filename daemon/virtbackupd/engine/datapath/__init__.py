"""The data path of every job: the copy engine (copy.py) and reading a
backup image's content back (content.py)."""

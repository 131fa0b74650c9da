"""Keeping the repository and its catalogue sound: prune (prune.py and
merge_digests.py), verify (verify.py), and the catalogue made to say what
the folders say (catalogue.py)."""

"""The `virtbackupd` service."""

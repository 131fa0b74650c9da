"""The operator's command line, `virtbackup`."""

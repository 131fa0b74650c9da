"""Reading the daemon config and policy files (YAML) into typed values.

Every error names the file, the line, the key and what was expected.
"""

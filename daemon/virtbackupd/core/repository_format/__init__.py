"""The backup repository's on-disk format as typed values: the manifest and
the records written beside it (prune journal, undo log, failed attempts,
holds), their JSON codec, their versions and which operations accept which
version. Pure: JSON values in, typed values out; where they are stored is
the storage backend's business (storage.py says what one offers;
adapters.repository is the local folder backend). docs/repository-format.md
specifies the format for readers without this project."""

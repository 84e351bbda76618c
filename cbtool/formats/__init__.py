"""Files on disk: checkpoints, code stores, their schemas, sha256 records and store links (docs/formats.md)."""

"""What the tests share: the repository root, tiny models and shards (`pipelines`), the parity rule's
weights and fixtures (`parity`), a real S3 server (`s3`). Imported one way: `from helpers.X import ...`."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root."""

"""The storage service. Where data lives: a local path, or a URI of an object store (`s3://bucket/key`, and whatever else
pyarrow's or fsspec's filesystems resolve, e.g. `gs://`). The one owner of "a data path is a URI".

Local paths stay `pathlib` paths and behave exactly as before. Object stores are reached through
`pyarrow.fs` with each store's standard credentials: for S3 the AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `~/.aws/credentials`) and endpoint and region
(`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url`, `AWS_REGION`,
`AWS_DEFAULT_REGION`). Credentials never come from params or URIs, and `scrub` removes them from every
message this module raises.

Publishing on an object store. S3 has no rename, and a pyarrow upload that fails half-way is still
completed under its name (closing the stream commits it). So:
- one object (`atomic_output`, `write_bytes_atomic`): written under a hidden temporary key beside its
  final name (`.<name>.psp-partial-<random>.tmp`), then moved (server-side copy + delete) to the final key; a failed
  write deletes the temporary key. Readers never see a partial object under a final name.
- a folder of files and its manifest (`published_folder`): the files go under a fresh generation
  prefix (`<folder>/<generation>/<name>`), the manifest (`<folder>/<manifest>`) is written last and lists
  them relative to the folder, then every other object under the folder (the previous generation, the
  leftovers of failed runs) is deleted. Readers trust only what the manifest lists, so they see the
  previous complete version or the new one, never a mix; a failed run leaves the previous one published.
  A reader still reading a version that a newer one replaced finds its files gone (FileNotFoundError):
  it reads the manifest again (locally the same holds: the folder is swapped whole).
- reading (`read_bytes`): pyarrow reads an object by its size, then a ranged GET; an object replaced in
  between is read again, so a manifest is always read whole.
"""
from pipelines.services.storage.cache import cache_root, cached_copy, cached_weights
from pipelines.services.storage.credentials import SECRET_ENV_VARS, has_credentials, scrub
from pipelines.services.storage.files import (
    OUTPUT_MARKER,
    FolderListing,
    atomic_dir,
    atomic_path,
    file_digest,
    is_image_name,
    json_document,
    list_folder,
    output_folder,
    read_regular_file,
    remove_own_temporaries,
    temporary_prefix,
)
from pipelines.services.storage.locations import (
    Location,
    ReferenceKind,
    is_registry_reference,
    is_remote,
    is_uri,
    reference_kind,
)
from pipelines.services.storage.objects import (
    access_error,
    atomic_output,
    check_access,
    delete_file,
    digest,
    exists,
    list_files,
    open_input_file,
    parquet_columns,
    parquet_schema,
    read_bytes,
    reader_filesystem,
    write_bytes_atomic,
    write_json_atomic,
)
from pipelines.services.storage.publishing import FolderWriter, WrittenFile, claimed_folder, published_folder
from pipelines.services.storage.s3 import CHECK_TIMEOUT_S, CONNECT_TIMEOUT_S, s3_filesystem

__all__ = [
    "OUTPUT_MARKER", "SECRET_ENV_VARS", "FolderListing", "FolderWriter", "Location", "ReferenceKind", "StageInput",
    "WrittenFile",
    "access_error", "atomic_dir", "atomic_output", "atomic_path", "cache_root", "cached_copy", "cached_weights",
    "check_access", "claimed_folder", "delete_file", "digest", "exists", "file_digest", "is_image_name",
    "is_registry_reference", "is_remote", "is_uri", "json_document", "list_files", "list_folder", "open_input_file",
    "output_folder", "parquet_columns", "parquet_schema", "published_folder", "read_bytes", "read_regular_file",
    "remove_own_temporaries", "temporary_prefix",
    "has_credentials", "reader_filesystem", "reference_kind", "CHECK_TIMEOUT_S", "CONNECT_TIMEOUT_S", "s3_filesystem", "scrub", "write_bytes_atomic", "write_json_atomic",
]
from pipelines.services.storage.inputs import StageInput

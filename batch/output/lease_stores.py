"""The conditional operations a lease needs, one implementation per object store.

A lease (`batch.output.lease`) is correct only if the store refuses a write whose
condition does not hold, atomically:

- S3: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace or delete;
- Google Cloud Storage: ``ifGenerationMatch=0`` to create, ``ifGenerationMatch=<generation>``
  to replace or delete;
- Azure Blob: ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace or delete.

Each store answers a refused condition with None or False (the object exists, changed, or
is gone) and raises `OutputError` for anything else, said by `store_errors.reason` (no
secret). A version is the store's ETag or generation, as text. Credentials come from each
SDK's own environment, as for the rest of the output: the AWS chain, Google's application
default credentials (``STORAGE_EMULATOR_HOST`` for an emulator), and the ``AZURE_STORAGE_*``
variables adlfs reads.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Final, Protocol

from batch.errors import OutputError
from batch.output import store_errors

# Each request is small: a store that does not answer in this long is failing.
REQUEST_TIMEOUT_S: Final = 30.0


class LeaseStore(Protocol):
    """Conditional writes of small objects named by URL (``scheme://bucket/key``)."""

    def read(self, url: str) -> tuple[bytes, str] | None:
        """The object's bytes and version, or None when there is none."""
        ...

    def create_if_absent(self, url: str, body: bytes) -> str | None:
        """Write the object if there is none; its version, or None when one exists."""
        ...

    def replace_if_version(self, url: str, body: bytes, version: str) -> str | None:
        """Rewrite the object if it is still at ``version``; the new version, or None when
        it changed or is gone."""
        ...

    def delete_if_version(self, url: str, version: str) -> bool:
        """Delete the object if it is still at ``version``; whether it was."""
        ...

    def list_prefix(self, url: str) -> list[str]:
        """The URLs of the objects whose URL starts with ``url``."""
        ...


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (bucket, key)."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _failed(url: str, doing: str, said: BaseException | str) -> OutputError:
    return OutputError(url, doing, store_errors.reason(said, url))


def store_for(url: str) -> LeaseStore | None:
    """The lease store for an output at ``url``, or None for a store without one."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("s3", "s3a"):
        return S3Store(s3_client())
    if scheme in ("gs", "gcs"):
        return GcsStore(gcs_client(url))
    if scheme in ("az", "abfs", "abfss"):
        return AzureStore(azure_client(url))
    return None


# --- S3 ----------------------------------------------------------------------------------


def s3_client() -> Any:
    """A botocore S3 client from the standard AWS environment (endpoint, region,
    credentials chain); botocore comes with the ``s3`` extra. Each is made from a new
    session (the environment is read again) sharing one loader of botocore's service
    descriptions: parsing those is most of a client's cost (0.1-0.3 s)."""
    try:
        import botocore.session  # type: ignore[import-untyped]
    except ImportError:
        raise OutputError(
            "s3://", "lock", "S3 outputs need the s3 extra: pip install 'pulse-batch[s3]'"
        ) from None
    session = botocore.session.get_session()
    loader = _botocore_loader(session.get_config_variable("data_path"))
    session.register_component("data_loader", loader)
    return session.create_client("s3")


@functools.cache
def _botocore_loader(data_path: str | None) -> Any:
    """botocore's loader of its JSON service descriptions (from ``AWS_DATA_PATH`` too), made
    once per search path: it keeps what it parsed."""
    import botocore.loaders  # type: ignore[import-untyped]

    return botocore.loaders.create_loader(data_path)


# If-Match on a deleted object: 404 (NoSuchKey); a racing conditional write: 409.
_S3_REFUSED: Final = ("PreconditionFailed", "ConditionalRequestConflict", "412", "NoSuchKey", "404")


class S3Store:
    def __init__(self, client: Any) -> None:
        self.client = client

    @staticmethod
    def _code(error: Exception) -> str:
        response = getattr(error, "response", None) or {}
        return str(response.get("Error", {}).get("Code", "") or type(error).__name__)

    def _put(self, url: str, body: bytes, **condition: str) -> str | None:
        bucket, key = split_url(url)
        try:
            answer = self.client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
        except Exception as error:
            if self._code(error) in _S3_REFUSED:
                return None
            raise _failed(url, "take the lock", self._code(error)) from error
        return str(answer["ETag"])

    def read(self, url: str) -> tuple[bytes, str] | None:
        bucket, key = split_url(url)
        try:
            answer = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as error:
            if self._code(error) in ("NoSuchKey", "404"):
                return None
            raise _failed(url, "read the lock", self._code(error)) from error
        return answer["Body"].read(), str(answer["ETag"])

    def create_if_absent(self, url: str, body: bytes) -> str | None:
        return self._put(url, body, IfNoneMatch="*")

    def replace_if_version(self, url: str, body: bytes, version: str) -> str | None:
        return self._put(url, body, IfMatch=version)

    def delete_if_version(self, url: str, version: str) -> bool:
        bucket, key = split_url(url)
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except Exception as error:
            if self._code(error) in _S3_REFUSED:
                return False
            raise _failed(url, "release the lock", self._code(error)) from error
        return True

    def list_prefix(self, url: str) -> list[str]:
        bucket, key = split_url(url)
        scheme = url.split("://", 1)[0]
        try:
            listed = self.client.list_objects_v2(Bucket=bucket, Prefix=key)
        except Exception as error:
            raise _failed(url, "list the locks", self._code(error)) from error
        return [f"{scheme}://{bucket}/{entry['Key']}" for entry in listed.get("Contents", [])]


# --- Google Cloud Storage -----------------------------------------------------------------


def gcs_client(url: str = "gs://") -> Any:
    """A google-cloud-storage client (gcsfs, the ``gcs`` extra, brings the library) with
    Google's application default credentials, or none against ``STORAGE_EMULATOR_HOST``."""
    try:
        from google.cloud import storage  # type: ignore[attr-defined,import-untyped,unused-ignore]
    except ImportError:
        raise OutputError(
            url, "lock", "GCS outputs need the gcs extra: pip install 'pulse-batch[gcs]'"
        ) from None
    try:
        return storage.Client()
    except Exception as error:  # no credentials, or no project they name
        raise _failed(url, "reach", error) from error


class GcsStore:
    """Generations are GCS's versions: every write of an object makes a new one, and
    generation 0 matches only an absent object."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _blob(self, url: str) -> Any:
        bucket, key = split_url(url)
        return self.client.bucket(bucket).blob(key)

    @staticmethod
    def _status(error: Exception) -> int:
        code = getattr(error, "code", None)
        return code if isinstance(code, int) else 0

    def _put(self, url: str, body: bytes, generation: int) -> str | None:
        blob = self._blob(url)
        try:
            blob.upload_from_string(
                body,
                content_type="application/json",
                if_generation_match=generation,
                timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as error:
            if self._status(error) in (404, 409, 412):
                return None
            raise _failed(url, "take the lock", error) from error
        return str(blob.generation)

    def read(self, url: str) -> tuple[bytes, str] | None:
        bucket, key = split_url(url)
        for _ in range(3):  # bounded: each round loses only to a write in between
            try:
                blob = self.client.bucket(bucket).get_blob(key, timeout=REQUEST_TIMEOUT_S)
                if blob is None:
                    return None
                # The bytes of the generation just read, or 412 if it changed meanwhile.
                # (Kept aside: the download resets `blob.generation` from its headers.)
                generation = str(blob.generation)
                body = blob.download_as_bytes(
                    if_generation_match=blob.generation, timeout=REQUEST_TIMEOUT_S
                )
            except Exception as error:
                if self._status(error) == 404:
                    return None
                if self._status(error) == 412:
                    continue
                raise _failed(url, "read the lock", error) from error
            return bytes(body), generation
        raise OutputError(url, "read the lock", "it changed at every read; try again")

    def create_if_absent(self, url: str, body: bytes) -> str | None:
        return self._put(url, body, 0)

    def replace_if_version(self, url: str, body: bytes, version: str) -> str | None:
        return self._put(url, body, int(version))

    def delete_if_version(self, url: str, version: str) -> bool:
        try:
            self._blob(url).delete(if_generation_match=int(version), timeout=REQUEST_TIMEOUT_S)
        except Exception as error:
            if self._status(error) in (404, 412):
                return False
            raise _failed(url, "release the lock", error) from error
        return True

    def list_prefix(self, url: str) -> list[str]:
        bucket, key = split_url(url)
        scheme = url.split("://", 1)[0]
        try:
            names = [
                blob.name
                for blob in self.client.list_blobs(bucket, prefix=key, timeout=REQUEST_TIMEOUT_S)
            ]
        except Exception as error:
            raise _failed(url, "list the locks", error) from error
        return [f"{scheme}://{bucket}/{name}" for name in names]


# --- Azure Blob ---------------------------------------------------------------------------


def _azure_account(url: str) -> str | None:
    """The account an ``abfs://container@account.dfs.core.windows.net/...`` URL names."""
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" not in netloc:
        return None
    return netloc.split("@", 1)[1].split(".", 1)[0]


def azure_client(url: str) -> Any:
    """A BlobServiceClient (azure-storage-blob; adlfs, the ``azure`` extra, brings it) from
    the variables adlfs reads: ``AZURE_STORAGE_CONNECTION_STRING``, or
    ``AZURE_STORAGE_ACCOUNT_NAME`` (or the account in an abfs URL) with
    ``AZURE_STORAGE_ACCOUNT_KEY``, ``AZURE_STORAGE_SAS_TOKEN``, or else Azure AD
    (azure-identity's default chain)."""
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError:
        raise OutputError(
            url, "lock", "Azure outputs need the azure extra: pip install 'pulse-batch[azure]'"
        ) from None
    timeouts: dict[str, Any] = {
        "connection_timeout": REQUEST_TIMEOUT_S,
        "read_timeout": REQUEST_TIMEOUT_S,
    }
    env = os.environ
    connection = env.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        try:
            return BlobServiceClient.from_connection_string(connection, **timeouts)
        except ValueError:  # its message may quote the string: say nothing of it
            raise OutputError(
                url, "reach", "AZURE_STORAGE_CONNECTION_STRING is not a valid connection string"
            ) from None
    account = _azure_account(url) or env.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise _failed(url, "reach", "NoAzureCredentials")
    credential: Any = env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_KEY")
    credential = credential or env.get("AZURE_STORAGE_SAS_TOKEN")
    if not credential:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:  # adlfs brings it; without it, only the variables above serve
            raise _failed(url, "reach", "NoAzureCredentials") from None
        credential = DefaultAzureCredential()
    return BlobServiceClient(
        f"https://{account}.blob.core.windows.net", credential=credential, **timeouts
    )


def _container(url: str) -> tuple[str, str]:
    """(container, blob name) of ``az://container/name`` or ``abfs://container@host/name``."""
    container, name = split_url(url)
    return container.split("@", 1)[0], name


class AzureStore:
    def __init__(self, client: Any) -> None:
        self.client = client

    def _blob(self, url: str) -> Any:
        container, name = _container(url)
        return self.client.get_blob_client(container, name)

    @staticmethod
    def _status(error: Exception) -> int:
        code = getattr(error, "status_code", None)
        return code if isinstance(code, int) else 0

    @staticmethod
    def _code(error: Exception) -> str:
        return str(getattr(error, "error_code", "") or type(error).__name__)

    def _put(self, url: str, body: bytes, **condition: Any) -> str | None:
        try:
            answer = self._blob(url).upload_blob(body, **condition)
        except Exception as error:
            # 409: it exists (create); 412: it changed; 404: it is gone (replace).
            if self._status(error) in (404, 409, 412):
                return None
            raise _failed(url, "take the lock", self._code(error)) from error
        return str(answer["etag"])

    def read(self, url: str) -> tuple[bytes, str] | None:
        try:
            download = self._blob(url).download_blob()
            body = download.readall()
        except Exception as error:
            if self._status(error) == 404:
                return None
            raise _failed(url, "read the lock", self._code(error)) from error
        return bytes(body), str(download.properties.etag)

    def create_if_absent(self, url: str, body: bytes) -> str | None:
        return self._put(url, body, overwrite=False)  # If-None-Match: *

    def replace_if_version(self, url: str, body: bytes, version: str) -> str | None:
        from azure.core import MatchConditions

        return self._put(
            url, body, overwrite=True, etag=version, match_condition=MatchConditions.IfNotModified
        )

    def delete_if_version(self, url: str, version: str) -> bool:
        from azure.core import MatchConditions

        try:
            self._blob(url).delete_blob(etag=version, match_condition=MatchConditions.IfNotModified)
        except Exception as error:
            if self._status(error) in (404, 412):
                return False
            raise _failed(url, "release the lock", self._code(error)) from error
        return True

    def list_prefix(self, url: str) -> list[str]:
        container, name = _container(url)
        base = url[: len(url) - len(name)] if name else url.rstrip("/") + "/"
        try:
            listed = self.client.get_container_client(container).list_blobs(name_starts_with=name)
            names = [blob.name for blob in listed]
        except Exception as error:
            raise _failed(url, "list the locks", self._code(error)) from error
        return [base + found for found in names]

"""What an object store's refusal means, said in one line that says what to do.

deltalake raises Rust error chains: several lines, ANSI colour codes around ``↳`` markers,
an XML body with request ids. botocore raises a class name or an error code. `reason`
turns either into one clause for an `OutputError` ("cannot read URL: <reason>"): missing or
refused credentials say which variables to set, a missing bucket says so, anything else
is the chain on one line. The values of the storage SDKs' secret variables are scrubbed,
though no store should echo them, and so are credentials found by pattern (a SAS ``sig=``
in a URL the error quotes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from batch.credentials import Scrubber, redact_credentials
from batch.storage import credentials_in_env, scheme

_ANSI: Final = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MAX_CHARS: Final = 300

# No credentials in the environment: the SDK fell back to the instance metadata service.
_MISSING: Final = (
    "169.254.169.254",
    "NoCredentialsError",
    "PartialCredentialsError",
    "Unable to locate credentials",
    "DefaultCredentialsError",  # google-auth found no application default credentials
    "NoAzureCredentials",  # said by the lease store when no AZURE_STORAGE_* variable is set
)
_REFUSED: Final = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
)
# An unsigned request refused (deltalake's words), sent because none were set (see delta).
_UNSIGNED_REFUSED: Final = ("lacked the necessary privileges",)
_DENIED: Final = ("AccessDenied", "AuthorizationFailure", "AuthorizationPermissionMismatch")
_NO_BUCKET: Final = ("NoSuchBucket", "ContainerNotFound", "BucketNotFound")

_SET_CREDENTIALS: Final = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN for "
    "temporary ones) or AWS_PROFILE in the environment, and AWS_REGION or AWS_ENDPOINT_URL "
    "(or output.storage_options) to say where the store is",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file in the "
    "environment (or log in with gcloud auth application-default login)",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or "
    "AZURE_STORAGE_CONNECTION_STRING in the environment (or log in with Azure AD)",
}
_FAMILY: Final = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
_NAMES: Final = {"s3": "S3", "gs": "Google Cloud Storage", "az": "Azure"}


# Where an AWS SDK finds credentials besides the instance metadata service.
_AWS_CREDENTIAL_SOURCES: Final = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",  # EKS (IRSA)
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS, AWS Batch
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def aws_credentials_named(env: Mapping[str, str], home: Path) -> bool:
    """Whether the environment (or a shared credentials file: AWS_SHARED_CREDENTIALS_FILE,
    else ``home``'s ``.aws/credentials``) names AWS credentials other than an EC2
    instance's role. Pure but for one file check."""
    if any(env.get(name) for name in _AWS_CREDENTIAL_SOURCES):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE")
    return (Path(shared) if shared else home / ".aws" / "credentials").is_file()


def one_line(text: str) -> str:
    """``text`` without colour codes, its lines joined with ``; `` and cut to a few
    hundred characters."""
    lines = (line.strip().lstrip("↳").strip() for line in _ANSI.sub("", text).splitlines())
    joined = " ".join("; ".join(line for line in lines if line).split())
    return joined if len(joined) <= _MAX_CHARS else joined[: _MAX_CHARS - 1] + "…"


def reason(error: BaseException | str, url: str) -> str:
    """Why the store at ``url`` refused, and what to set: one clause, no secret."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = redact_credentials(Scrubber(*credentials_in_env(os.environ)).scrub_whole(text))
    family = _FAMILY.get(scheme(url) or "", scheme(url) or "")
    hint = _SET_CREDENTIALS.get(family)
    if hint is not None:
        unsigned = _found(text, _UNSIGNED_REFUSED) and not credentials_in_env(os.environ)
        if _found(text, _MISSING) or unsigned:
            return f"no {_NAMES[family]} credentials were found; {hint}"
        marker = _found(text, _REFUSED)
        if marker:
            return f"the store refused the credentials ({marker}); {hint}"
        marker = _found(text, _NO_BUCKET)
        if marker:
            bucket = url.split("://", 1)[1].split("/", 1)[0]
            return f"bucket {bucket} does not exist ({marker}); create it or fix output.path"
        marker = _found(text, _DENIED)
        if marker:
            return (
                f"access denied ({marker}): the credentials in the environment may not use "
                f"this location; grant them access to it, or {hint}"
            )
    return one_line(text)


def _found(text: str, markers: tuple[str, ...]) -> str:
    return next((marker for marker in markers if marker in text), "")

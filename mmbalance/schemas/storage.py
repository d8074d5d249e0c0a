"""The recipe's ``storage:`` section: how object-store URIs (s3://, gs://) are reached.

Credentials are never part of a recipe (recipes are copied, committed and written into run.json):
they come from the environment, as the store's own tools read them (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, an instance role; GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from mmbalance.schemas.balance import StrictModel

_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


class StorageSpec(StrictModel):
    """S3-compatible endpoint settings; empty = AWS (or what AWS_ENDPOINT_URL / AWS_REGION say)."""

    # http(s)://host:port of an S3-compatible store (MinIO, Ceph, R2, moto); None: AWS or AWS_ENDPOINT_URL
    endpoint: str | None = None
    region: str | None = None  # None: the bucket's own region on AWS, AWS_REGION, else us-east-1 with an endpoint
    anonymous: bool = False  # unsigned requests: public buckets, no credentials needed
    create_bucket: bool = False  # create the output bucket when it does not exist (else one-line error, exit 2)
    lock: bool = True  # the run lock object OUT/.lock, written with a conditional put (S3 only)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if isinstance(name, str) and any(w in name.lower() for w in _SECRET_WORDS):
                    raise ValueError(
                        f"'{name}': credentials are never read from a recipe; set them in the environment "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
        return data

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value

    def is_default(self) -> bool:
        return self == StorageSpec()


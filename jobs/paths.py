"""Where a job may read and write: local paths and URIs through pyarrow filesystems, credentials kept out of
what is shown, and the deployment's input / output roots."""
import os
import posixpath
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from batchgen.jobs.errors import JobInputError, JobOutputError

if TYPE_CHECKING:
    from batchgen.jobs.spec import JobSpec

_SECRET_PARAM = re.compile(r"secret|password|passwd|token|key|sig|credential", re.IGNORECASE)


def is_uri(location: str) -> bool:
    return "://" in location


def redact_url(url: str) -> str:
    """The URL without its password (or user:secret pair) and secret-looking query values
    (s3://bucket/x?secret_key=...), safe for logs, errors and stats."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
    if query:
        query = urlencode([(name, "***" if _SECRET_PARAM.search(name) else value)
                           for name, value in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or a URI (s3://, gs://, file://...)."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def check_roots(spec: "JobSpec") -> None:
    """Refuse a job whose input lies outside BATCHGEN_INPUT_ROOT, or whose output outside BATCHGEN_OUTPUT_ROOT
    (each when set): a deployment whose workers must read and write only there, whoever submits. `..` and
    symbolic links are resolved before comparing; a URI must lie under a URI root. Raises JobInputError /
    JobOutputError naming the location."""
    for location, variable, error in (("input", "BATCHGEN_INPUT_ROOT", JobInputError),
                                      ("output", "BATCHGEN_OUTPUT_ROOT", JobOutputError)):
        root = os.environ.get(variable)
        if root and not _inside(getattr(spec, location), root):
            raise error(f"{redact_url(getattr(spec, location))}: the {location} must lie under {variable} "
                        f"({redact_url(root)})")


def _inside(location: str, root: str) -> bool:
    if is_uri(location) or is_uri(root):
        where, base = urlsplit(location), urlsplit(root)
        path, root_path = posixpath.normpath(where.path or "/"), posixpath.normpath(base.path or "/")
        same_place = (is_uri(location) and is_uri(root)
                      and (where.scheme, where.hostname) == (base.scheme, base.hostname))
    else:
        path, root_path, same_place = os.path.realpath(location), os.path.realpath(root), True
    return same_place and (path == root_path or path.startswith(root_path.rstrip("/") + "/"))

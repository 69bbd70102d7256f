"""Local and object-storage paths: a workdir, a checkpoint or a prepared dataset may be a local
folder or a URL such as `gs://bucket/runs/x` (docs/checkpointing.md, "Cloud storage").

Local paths stay `pathlib.Path`; URLs become `etils.epath.Path` (the path type Orbax itself
uses), which reads and writes Google Cloud Storage through gcsfs (`pip install -e '.[gcs]'`) and
other fsspec file systems the same way. Both have the pathlib methods the rest of the code calls
(`/`, `exists`, `is_dir`, `iterdir`, `read_text`, `write_text`, `mkdir`, `name`, `parent`).
Checkpoint arrays are written by TensorStore, which talks to GCS itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage (`gs://...`, `s3://...`) rather than a local file."""
    return bool(_URL.match(str(path)))


def as_path(path: Any) -> Any:
    """`pathlib.Path` for a local path, `etils.epath.Path` for a URL (or an epath already)."""
    if isinstance(path, Path):
        return path
    text = str(path)
    if is_url(text):
        from etils import epath

        return epath.Path(text)
    return Path(text)


def absolute(path: Any) -> Any:
    """An absolute local path (Orbax wants one), or the URL as it is."""
    path = as_path(path)
    return path if is_url(path) else path.absolute()


def is_missing(error: OSError) -> bool:
    """Whether `error` says the file or object does not exist: FileNotFoundError locally; object
    storage clients raise other OSErrors ("No such object", HTTP 404)."""
    return isinstance(error, FileNotFoundError) or "No such" in str(error) or "404" in str(error)


def move(src: Any, dst: Any) -> None:
    """Moves a file or folder (a folder of objects on object storage) to `dst`, creating its
    parent."""
    if is_url(src):
        import fsspec

        fs, _, (source,) = fsspec.get_fs_token_paths(str(src))
        fs.mv(source, fs._strip_protocol(str(dst)), recursive=True)
        return
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)

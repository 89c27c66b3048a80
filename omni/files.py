"""The one way omni writes a file others may read meanwhile (a run's JSON, a checkpoint's checksums, a tokenizer,
an exported model, a cache): atomically, with the permissions a plain open() gives."""
from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (a kill mid-write, or several processes); the
    file gets 0666 less the umask, as open() would give (mkstemp's are private to the user)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

"""The token of a one-machine Ray (`rlm-async batch --ray local`), kept out of ~/.ray.

Ray 2.60's `ray.init()` without an address starts a local cluster with token
authentication on, and when it finds no token it saves a new one to `~/.ray/auth_token`
(mode 0644). That file outlives the run: every later `ray start --head` on the machine
finds it and turns token authentication on for its cluster, and a driver or `ray status`
that joins such a cluster by its address (which never picks up a saved token by itself) is
refused with `InvalidAuthToken`.

`local_token()` leaves authentication on but gives Ray a token of its own instead: a
random one in a 0700 temporary directory, named by `RAY_AUTH_TOKEN_PATH` in this process's
environment (so the Ray processes `ray.init` starts read it too), and deleted with the
directory when the block ends. Nothing is written under ~/.ray. Where the environment
already configures Ray's authentication (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN` or
`RAY_AUTH_TOKEN_PATH`), it is left as it is.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AUTH_ENV", "local_token"]

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
"""The variables through which Ray 2.60 reads its authentication settings."""


@contextmanager
def local_token() -> Iterator[Path | None]:
    """Within the block, a local `ray.init()` authenticates with a fresh token from a
    private temporary file (its path is yielded), not one saved under ~/.ray. Start the
    local Ray and shut it down inside the block. Yields None, changing nothing, where the
    environment already says how Ray authenticates."""
    if any(name in os.environ for name in AUTH_ENV):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="rlm-ray-auth-") as private:  # 0700
        path = Path(private) / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        try:
            yield path
        finally:
            # ray.init sets RAY_AUTH_MODE=token here too (for the processes it starts):
            # both go, so nothing after the block inherits a token that no longer exists.
            for name in AUTH_ENV:
                os.environ.pop(name, None)

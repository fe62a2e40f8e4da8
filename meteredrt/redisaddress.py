"""
Redis URLs: L{parse_redis_url} reads C{redis://[user:password@]host[:port][/db]}
and C{rediss://} (TLS) into a L{RedisAddress}.

Pure (standard library and attrs only), so that L{meteredrt.config} can
refuse a bad C{[cluster] redis} URL before anything starts.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from attrs import frozen

#: The default Redis port.
DEFAULT_PORT = 6379


@frozen
class RedisAddress:
    """
    Where a Redis server is and how to log in to it.
    """

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        # Never show the password in logs.
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read a C{redis://} or C{rediss://} URL.

    @raise ValueError: with a message saying what is wrong.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a Redis URL ({e}): {url!r}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"a Redis URL needs a host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a Redis URL takes no query or fragment: {url!r}")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and path.isascii()):
        raise ValueError(f"the Redis database is a number (redis://host:port/0), not {path!r}")
    db = int(path) if path else 0
    if db > 10_000:
        raise ValueError(f"the Redis database number {db} is out of range")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        # redis://secret@host is how many tools spell a password alone.
        username, password = None, username
    return RedisAddress(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        tls=parts.scheme == "rediss",
    )

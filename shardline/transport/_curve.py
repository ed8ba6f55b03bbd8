"""CURVE keypairs on disk (``shardline keys generate DIR``) and allow-lists."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

__all__ = ["KeyPair", "load_allow_keys"]

_NAME = "node"


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    """Z85-encoded public key (40 ASCII characters)."""
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def write(cls, directory: str | os.PathLike[str], *, overwrite: bool = False) -> KeyPair:
        """Create ``DIR/node.key`` (public, shareable) and ``DIR/node.key_secret`` (0600).

        A keypair already in ``DIR`` is kept: ``FileExistsError``, unless ``overwrite``
        (replacing it locks the old public key out of every allow-list holding it)."""
        path = Path(directory)
        if not overwrite:
            for name in (f"{_NAME}.key", f"{_NAME}.key_secret"):
                if (path / name).exists():
                    raise FileExistsError(f"{path / name} exists: {path} already holds a "
                                          "keypair")
        path.mkdir(parents=True, exist_ok=True)
        _, secret_file = zmq.auth.create_certificates(str(path), _NAME)
        os.chmod(secret_file, 0o600)
        return cls.load(path)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> KeyPair:
        """Read the keypair that ``write`` (or ``shardline keys generate``) made."""
        secret_file = Path(directory) / f"{_NAME}.key_secret"
        if not secret_file.is_file():
            raise FileNotFoundError(
                f"no CURVE key in {directory} (expected {secret_file}); "
                "create one with 'shardline keys generate DIR'")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key")
        return cls(public, secret)


def load_allow_keys(items: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Client public keys to accept, from Z85 strings, ``.key`` certificate files,
    directories of them, or text files with one Z85 key per line."""
    keys: list[str] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if len(text) == 40 and not path.exists():
            keys.append(text)
        elif path.is_dir():
            keys.extend(load_allow_keys(sorted(path.glob("*.key"))))
        elif path.is_file():
            keys.extend(_keys_in_file(path))
        else:
            raise ValueError(f"{text!r} is neither a 40-character Z85 key nor a key file")
    return keys


def _keys_in_file(path: Path) -> list[str]:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
        return [public.decode()]
    except (ValueError, OSError):
        pass
    keys = [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    for key in keys:
        if len(key) != 40:
            raise ValueError(f"{path}: {key!r} is not a 40-character Z85 public key")
    return keys

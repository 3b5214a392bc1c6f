"""A node's permanent identity: an Ed25519 key pair kept in the node's home directory.

The node id is the public key in lowercase base32 (52 characters). The virtual address is an IPv6
unique-local address (fd00::/8) derived from the key, so it is stable for the key's lifetime and
needs no allocation authority.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, CryptoError, IdentityError
from .home import check_home, check_private_file, fsync_directory
from .net.tunnel import crypto

KEY_FILE = "identity.key"
NODE_ID_LENGTH = 52


def default_home() -> Path:
    return Path(os.environ.get("PILOT_HOME") or Path.home() / ".pilot-agents")


@functools.lru_cache(maxsize=4096)
def node_id_from_key(public_key: bytes) -> str:
    # Cached: every received message names its sender, and base32 costs microseconds.
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def _decode_node_id(node_id: str) -> bytes:
    text = node_id.strip().upper()
    if len(text) != NODE_ID_LENGTH:
        raise ConfigError(
            f"{node_id!r} is not a node id (expected {NODE_ID_LENGTH} base32 characters)"
        )
    try:
        key = base64.b32decode(text + "====")
    except ValueError:
        raise ConfigError(f"{node_id!r} is not a node id (not base32)") from None
    if len(key) != crypto.PUBLIC_KEY_SIZE:
        raise ConfigError(f"{node_id!r} is not a node id")
    return key


def looks_like_node_id(text: str) -> bool:
    """Whether ``text`` has the form of a node id (a typo'd one too: see key_from_node_id)."""
    try:
        _decode_node_id(text)
    except ConfigError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def key_from_node_id(node_id: str) -> bytes:
    """The raw public key of a node id; ConfigError if it isn't one. A node id must be an Ed25519
    key whose X25519 form the handshake can use: a typo in a node id almost always yields 32 bytes
    that are not one, which we refuse here rather than when a tunnel needs it. Cached: the check
    costs about 50 us."""
    key = _decode_node_id(node_id)
    try:
        crypto.ed25519_pk_to_x25519(key)
    except CryptoError:
        raise ConfigError(
            f"{node_id!r} is not a node id: it is not a valid public key (a typo?)"
        ) from None
    return key


def virtual_address(public_key: bytes) -> ipaddress.IPv6Address:
    digest = hashlib.blake2b(public_key, digest_size=15, person=b"pilot-vaddr").digest()
    return ipaddress.IPv6Address(b"\xfd" + digest)


@dataclass(frozen=True)
class Identity:
    secret_key: bytes  # libsodium's 64-byte Ed25519 secret key (seed + public key)
    public_key: bytes

    @property
    def node_id(self) -> str:
        return node_id_from_key(self.public_key)

    @property
    def virtual_address(self) -> ipaddress.IPv6Address:
        return virtual_address(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return crypto.ed25519_sign(self.secret_key, message)

    @classmethod
    def generate(cls) -> Identity:
        secret, public = crypto.ed25519_keypair()
        return cls(secret, public)

    @classmethod
    def load_or_create(cls, home: Path) -> Identity:
        """The identity stored in ``home``, created there (mode 0600) on first use."""
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_home(home)
        path = home / KEY_FILE
        try:
            return cls.load(path)
        except FileNotFoundError:
            pass
        # Written whole to a file of our own, then linked into place: link() never replaces,
        # so of two processes creating it at once one wins and the other reads the winner's
        # complete key, and a crash leaves no key file at all rather than an empty one.
        tmp = home / f".{KEY_FILE}.{os.getpid()}.{crypto.random_bytes(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "w") as file:
                    file.write(crypto.random_bytes(32).hex() + "\n")
                    file.flush()
                    os.fsync(file.fileno())
                os.link(tmp, path)
                fsync_directory(home)
            except FileExistsError:
                pass  # another process created it first: its key is the one
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise IdentityError(f"cannot create {path}: {exc.strerror or exc}") from None
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Raises FileNotFoundError if absent, IdentityError if readable by others or malformed,
        UnsafeHomeError if another user owns it."""
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        check_private_file(path, info)
        try:
            seed = bytes.fromhex(path.read_text().strip())
        except (ValueError, UnicodeDecodeError):
            raise IdentityError(f"{path} is not a pilot-agents key file") from None
        if len(seed) != 32:
            raise IdentityError(f"{path} holds a key of the wrong length")
        secret, public = crypto.ed25519_seed_keypair(seed)
        return cls(secret, public)

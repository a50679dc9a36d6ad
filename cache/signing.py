"""Ed25519 signatures over a bundle's manifest, through the optional `cryptography` package.

A digest proves that a bundle's bytes are the ones its manifest names, not who made them; and
cache artifacts are executable code. So a bundle may carry `manifest.sig`:

    {"algorithm": "ed25519", "public_key": "<base64 of the 32 raw key bytes>",
     "signature": "<base64 of the 64-byte signature over the exact manifest bytes>"}

The embedded public key only names the signer in messages; it is never trusted: a signature
is checked against the public key the importer names. Keys are PEM files in the formats
OpenSSL writes (PKCS#8 private key, SubjectPublicKeyInfo public key), so
`openssl genpkey -algorithm ed25519 -out signing.pem` and
`openssl pkey -in signing.pem -pubout -out signing.pub` make keys that work here too.

`cryptography` is imported only when a key is made, used or checked (`pip install
'torch-kiln[sign]'`): everything else in cache/ works without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kiln.cache.atomic import FILE_MODE, fsync_dir
from kiln.cache.errors import CacheError

ALGORITHM = "ed25519"
PUBLIC_FILE_MODE = 0o644


class SignatureError(CacheError):
    """A bundle's signature is missing, by another key, or does not match its manifest."""


def _crypto() -> Any:
    """The pieces of `cryptography` used here, or CacheError saying how to install it."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise CacheError("signing bundles needs the 'cryptography' package: pip install 'torch-kiln[sign]' "
                         "(or pip install 'cryptography>=42')") from None
    return ed25519, serialization, InvalidSignature


def fingerprint(public_raw: bytes) -> str:
    """`SHA256:<base64>` of a raw 32-byte public key (the spelling ssh uses), for messages."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_raw).digest()).decode().rstrip("=")


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair as PEM (private 0o600, public 0o644); return its fingerprint.

    Refuses (CacheError) to overwrite either file: losing a signing key is not undoable.
    """
    ed25519, serialization, _ = _crypto()
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.absolute() == public_path.absolute():
        raise CacheError(f"the private and public key files must differ, both are {private_path}")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise CacheError(f"key file {path} already exists; refusing to overwrite it")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, FILE_MODE)
    try:
        _write_new(public_path, public_pem, PUBLIC_FILE_MODE)
    except BaseException:
        os.unlink(private_path)  # half a key pair is no key pair
        raise
    return fingerprint(_raw_public(public, serialization))


def sign_manifest(private_key_path: str | os.PathLike, manifest: bytes) -> bytes:
    """The `manifest.sig` document (JSON bytes) signing `manifest` with the key in the PEM file."""
    ed25519, serialization, _ = _crypto()
    pem = _read_key_file(private_key_path, "private")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CacheError(f"private key {private_key_path} is encrypted; kiln reads unencrypted PEM keys "
                         "(PKCS#8, as `kiln cache keygen` or `openssl genpkey -algorithm ed25519` write)") from None
    except ValueError as e:
        raise CacheError(f"private key {private_key_path} is not a PEM private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CacheError(f"private key {private_key_path} is a {type(key).__name__}, not an Ed25519 key")
    doc = {
        "algorithm": ALGORITHM,
        "public_key": base64.b64encode(_raw_public(key.public_key(), serialization)).decode(),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()


def public_key_fingerprint(public_key_path: str | os.PathLike) -> str:
    """Fingerprint of the public key in a PEM file (CacheError if it is not an Ed25519 one)."""
    _, serialization, _ = _crypto()
    return fingerprint(_raw_public(_load_public(public_key_path), serialization))


def check_signature(signature_doc: bytes | None, manifest: bytes, public_key_path: str | os.PathLike) -> str:
    """Fingerprint of the signer if `signature_doc` signs exactly `manifest` with the key in
    `public_key_path`; SignatureError otherwise: no signature, another key's, or a manifest
    changed after signing (or a damaged signature)."""
    _, serialization, invalid_signature = _crypto()
    public = _load_public(public_key_path)
    required = fingerprint(_raw_public(public, serialization))
    if signature_doc is None:
        raise SignatureError(f"the bundle is not signed, and a signature by {required} is required")
    algorithm, signer_raw, signature = _parse_signature(signature_doc)
    if algorithm != ALGORITHM:
        raise SignatureError(f"the bundle's signature uses {algorithm!r}; only {ALGORITHM} is accepted")
    signer = fingerprint(signer_raw)
    if signer != required:
        raise SignatureError(f"the bundle is signed by another key ({signer}), not by the required {required}")
    try:
        public.verify(signature, manifest)
    except invalid_signature:
        raise SignatureError(f"the bundle's signature by {signer} does not match its manifest: the manifest "
                             "was changed after signing, or the signature is damaged") from None
    return signer


def _parse_signature(raw: bytes) -> tuple[str, bytes, bytes]:
    try:
        doc = json.loads(raw)
        algorithm, public_key, signature = doc["algorithm"], doc["public_key"], doc["signature"]
        signer_raw = base64.b64decode(public_key, validate=True)
        signature_raw = base64.b64decode(signature, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise SignatureError(f"the bundle's manifest.sig is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(algorithm, str):
        raise SignatureError("the bundle's manifest.sig is malformed: 'algorithm' is not a string")
    return algorithm, signer_raw, signature_raw


def _load_public(path: str | os.PathLike) -> Any:
    ed25519, serialization, _ = _crypto()
    pem = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        hint = " (that is a private key: pass the public one)" if b"PRIVATE KEY" in pem else ""
        raise CacheError(f"public key {path} is not a PEM public key{hint}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CacheError(f"public key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _raw_public(public: Any, serialization: Any) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key_file(path: str | os.PathLike, kind: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as e:
        raise CacheError(f"cannot read {kind} key {path}: {e.strerror or e}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never replacing anything, never through a link) with `data` and `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # whatever the umask
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)

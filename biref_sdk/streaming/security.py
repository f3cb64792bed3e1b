"""Optional ZeroMQ CURVE authentication and encryption for networked setups.

The service listens on loopback by default and needs none of this. Across a network, give the
server its secret key file and a folder of the public keys it accepts (one ``*.key`` file per
microscope or subscriber, as written by :func:`generate_keys` or ``zmq.auth.create_certificates``);
give each client its own secret key file and the server's public key file. Keys never travel in
the protocol; they are read from files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _require_curve():
    import zmq

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE security; install a pyzmq wheel with libsodium")
    return zmq


@dataclass(frozen=True)
class CurveServer:
    """``secret_key_file``: the server's ``*.key_secret``. ``authorized_keys_dir``: public ``*.key``
    files of the clients allowed in; None lets any CURVE client in (encryption without
    authentication)."""

    secret_key_file: Path
    authorized_keys_dir: Path | None = None


@dataclass(frozen=True)
class CurveClient:
    """``secret_key_file``: this client's ``*.key_secret``; ``server_public_key_file``: the server's ``*.key``."""

    secret_key_file: Path
    server_public_key_file: Path


def generate_keys(directory, name: str) -> tuple[Path, Path]:
    """Write a CURVE key pair ``name.key`` (public) and ``name.key_secret`` into ``directory``."""
    zmq = _require_curve()
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    return Path(public), Path(secret)


def _load(path, need_secret: bool):
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CURVE key file not found: {path}")
    public, secret = zmq.auth.load_certificate(str(path))
    if need_secret and secret is None:
        raise ValueError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def configure_server(socket, keys: CurveServer) -> None:
    """Make ``socket`` (before bind) a CURVE server with the server's key pair."""
    _require_curve()
    public, secret = _load(keys.secret_key_file, need_secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def configure_client(socket, keys: CurveClient) -> None:
    """Make ``socket`` (before connect) a CURVE client of the server whose public key is given."""
    _require_curve()
    public, secret = _load(keys.secret_key_file, need_secret=True)
    server_public, _ = _load(keys.server_public_key_file, need_secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public


def start_authenticator(context, keys: CurveServer):
    """A running ZAP authenticator for ``context`` that admits the configured client keys."""
    zmq = _require_curve()
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    if keys.authorized_keys_dir is None:
        authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        location = Path(keys.authorized_keys_dir)
        if not location.is_dir():
            authenticator.stop()
            raise FileNotFoundError(f"authorized keys folder not found: {location}")
        authenticator.configure_curve(domain="*", location=str(location))
    return authenticator

"""The `flower-deploy` engine: a real SuperLink and SuperNodes, TLS, and SuperNode authentication.

With `launch: local` (tests, one machine) the stage starts them itself on 127.0.0.1: it makes a
CA and a server certificate, one EC key pair per client, starts the SuperLink with TLS and
`--enable-supernode-auth`, registers each client's public key with `flwr supernode register`,
then starts one SuperNode per client with its private key; a node whose key is not registered
is refused. With `launch: none` the federation already runs on separate machines (commands in
the README) and the stage only submits the run with `flwr run`. Either way Flower may not
install dependencies at run time (the environment is pinned) nor check for updates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from knowledgesg.console import console
from knowledgesg.errors import InputError, KsgError
from knowledgesg.fileio import write_bytes, write_text
from knowledgesg.spec import DeploySettings

APP_DIR = Path(__file__).parent / "flower_app"
FEDERATION = "ksg"


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    # the SuperLink and SuperNodes start flwr-serverapp / flwr-clientapp from this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path


def make_certificates(directory: Path, host: str = "127.0.0.1") -> Certificates:
    """A private CA and a server certificate for `host`, valid 30 days (EC P-384)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=30)}
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KnowledgeSG federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    try:
        alt = [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        alt = [x509.DNSName(host)]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName(alt), critical=False).sign(ca_key, hashes.SHA256()))
    paths = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    write_bytes(paths.ca, ca.public_bytes(serialization.Encoding.PEM))
    write_bytes(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    # never readable by others, not even between its creation and a chmod
    write_bytes(paths.server_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (what Flower's SuperNode authentication reads)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    write_bytes(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))  # 0600 from the start
    write_bytes(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def write_flwr_config(flwr_home: Path, address: str, ca: Path) -> None:
    write_text(flwr_home / "config.toml",
               f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{address}"\nroot-certificates = "{ca.resolve()}"\n')


@dataclass
class LocalFederation:
    """SuperLink and SuperNodes as separate processes on 127.0.0.1, torn down on exit."""

    directory: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.directory / "tls")
        self.flwr_home = self.directory / "flwr_home"
        self.env = flower_env(self.flwr_home)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115 (owned by the process)
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.directory, start_new_session=True)
        self.processes.append(process)
        return process

    def start_superlink(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._start("superlink", [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.server_cert),
                                  "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(port)])
        self._wait_for_port(port, "superlink")
        write_flwr_config(self.flwr_home, self.address, self.certs.ca)

    def _wait_for_port(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[-1].poll() is not None:
                raise KsgError(f"flower-deploy: the {name} exited at start: {self.log_tail(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise KsgError(f"flower-deploy: the {name} did not listen on port {port} within {timeout:.0f}s")

    def register(self, public_key: Path) -> None:
        result = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), FEDERATION], env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 or "registered successfully" not in result.stdout:
            raise KsgError(f"flower-deploy: registering {public_key.name} failed: {(result.stdout + result.stderr).strip()[-500:]}")

    def start_supernode(self, name: str, private_key: Path, node_config: str) -> subprocess.Popen:
        return self._start(f"supernode-{name}", [flower_bin("flower-supernode"), "--root-certificates", str(self.certs.ca), "--superlink", self.address,
                                                 "--auth-supernode-private-key", str(private_key), "--node-config", node_config,
                                                 "--port", str(free_port()), "--max-retries", "3"])

    def log_tail(self, name: str, chars: int = 800) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """Each process and what it started (a SuperNode's ClientApp processes, which may hang):
        each was started as the leader of its own process group. A group is signalled only while
        its leader is unreaped (running, or a zombie still holding the group id), so the id cannot
        have passed to another process."""
        running = [p for p in self.processes if p.returncode is None]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in running:
            while not _exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_group(process, signal.SIGKILL)  # what outlived the leader, or a leader too slow to stop
            process.wait()


def _exited(pid: int) -> bool:
    """Whether the process has exited (a zombie not yet reaped counts), without reaping it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def node_config(client_id: str, run_dir: Path, ledger_dir: Path | None = None, cap_epsilon: float | None = None, reproducible_noise: bool = False,
                delta: float | None = None, unit: str | None = None, model_cache: Path | None = None) -> str:
    """A SuperNode's config (`--node-config`). The privacy settings are the node's own: with
    `launch: local` (a trial on one machine, where the spec's author runs every node) the spec's."""
    parts = [f"client-id='{client_id}'", f"run-dir='{run_dir.resolve()}'"]
    if ledger_dir is not None:
        parts.append(f"ledger-dir='{ledger_dir.resolve()}'")
    if cap_epsilon is not None:
        parts.append(f"cap-epsilon={float(cap_epsilon)}")
    if reproducible_noise:
        parts.append("reproducible-noise=true")
    if delta is not None:
        parts.append(f"delta={float(delta)!r}")
    if unit is not None:
        parts.append(f"unit='{unit}'")
    if model_cache is not None:
        parts.append(f"model-cache='{model_cache.resolve()}'")
    return " ".join(parts)


def submit(job_path: Path, flwr_home: Path, timeout_s: float) -> None:
    """`flwr run` the app bundle with this job; waits for the run to end, streaming its log."""
    app = job_path.parent / "flower_app"
    shutil.copytree(APP_DIR, app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    command = [flower_bin("flwr"), "run", str(app), FEDERATION, "--run-config", f"job='{job_path.resolve()}'", "--stream"]
    result = subprocess.run(command, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout_s)
    for line in result.stdout.splitlines():
        if "fedtune round" in line:
            console.print(line[line.index("fedtune round"):])
    if result.returncode != 0:
        raise KsgError(f"flower-deploy: flwr run failed ({result.returncode}): {(result.stdout + result.stderr).strip()[-800:]}")


def deploy_settings_here(settings: DeploySettings, base_dir: Path, setting: str) -> DeploySettings:
    """The settings with the CA certificate's path resolved from the spec's directory (as every
    path in a spec is), refused in one line if launch: none has none to read."""
    if settings.launch != "none":
        return settings
    certificate = settings.root_certificates
    if certificate is not None:
        certificate = base_dir / certificate.expanduser()  # an absolute path stays as it is
    if certificate is None or not certificate.is_file():
        raise InputError(f"{setting}.root_certificates: the SuperLink's CA certificate is required with launch: none (TLS is not optional)"
                         + (f"; {certificate} is not a file" if certificate is not None else ""))
    return settings.model_copy(update={"root_certificates": certificate})


def run_deployed(job_path: Path, clients: list[str], settings: DeploySettings, node_config_of: Callable[[str], str], base_dir: Path,
                 setting: str = "fedtune.deploy") -> None:
    """Submit the job to a running federation (launch: none), or to one started here on 127.0.0.1
    with one SuperNode per client, configured by `node_config_of(client)` (launch: local).
    `base_dir`: the spec's directory; `setting`: where the settings are in the spec, for errors."""
    settings = deploy_settings_here(settings, base_dir, setting)
    if settings.launch == "none":
        home = settings.flwr_home or job_path.parent / "flwr_home"
        write_flwr_config(home, settings.superlink, settings.root_certificates)
        submit(job_path, home, settings.timeout_s)
        return
    with LocalFederation(job_path.parent / "federation") as federation:
        federation.start_superlink()
        for client_id in clients:
            private, public = make_node_key(federation.directory / "keys", client_id)
            federation.register(public)
            federation.start_supernode(client_id, private, node_config_of(client_id))
        submit(job_path, federation.flwr_home, settings.timeout_s)

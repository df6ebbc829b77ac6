"""A SuperLink and SuperNodes on loopback, started as real processes and killed by PID.

Used by the deployment tests; also a worked example of the commands in the README's
"Deployment" section.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower command: own home, no runtime installs, no telemetry."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", "")}


def make_tls_material(folder: Path, names: list[str]) -> dict[str, Path]:
    """A CA, a SuperLink certificate for localhost/127.0.0.1 signed by it, and one ECDSA
    (SECP384R1, OpenSSH format) key pair per SuperNode name."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption()))
    for name in names:
        sk = ec.generate_private_key(ec.SECP384R1())
        out[name] = folder / name
        out[name].write_bytes(sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
        out[name + ".pub"] = folder / f"{name}.pub"
        out[name + ".pub"].write_bytes(sk.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                    serialization.PublicFormat.OpenSSH))
    for p in out.values():
        p.chmod(0o600)
    return out


class Deployment:
    """One SuperLink and its SuperNodes in ``root``; ``close()`` kills all by PID."""

    def __init__(self, root: Path, *, tls: dict[str, Path] | None = None) -> None:
        self.root, self.tls = root, tls
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.cli_home = root / "cli-home"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn.append(f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true")
        (self.cli_home / "config.toml").write_text('[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                                   + "\n".join(conn) + "\n")

    def _start(self, name: str, args: list[str], home: Path | None = None) -> subprocess.Popen:
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc._log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        """``flower-superlink`` on 127.0.0.1:port (TLS + SuperNode authentication when set)."""
        args = [str(BIN / "flower-superlink"), "--port", str(self.port), "--database", str(self.root / "state.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                     "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth"]
        else:
            args.append("--insecure")
        self._start("superlink", args)
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.procs[0].poll() is not None:
                raise RuntimeError("flower-superlink exited: " + self.log("superlink")[-2000:])
            time.sleep(0.5)
        raise RuntimeError("flower-superlink did not open its port: " + self.log("superlink")[-2000:])

    def start_supernode(self, name: str, node_config: str, *, key: Path | None = None,
                        insecure: bool | None = None, retries: int | None = None) -> subprocess.Popen:
        """``flower-supernode`` with ``--node-config``; ``key``: its authentication key."""
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                "--node-config", node_config]
        if insecure if insecure is not None else not self.tls:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.tls["ca"])]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if retries is not None:
            args += ["--max-retries", str(retries), "--max-wait-time", "20"]
        return self._start(name, args)

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this SuperLink."""
        return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(self.cli_home), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def flwr_background(self, *args: str) -> subprocess.Popen:
        """A ``flwr`` CLI command started in the background (its own process group, killed
        with the rest by :meth:`close`)."""
        return self._start("flwr-cli", [str(BIN / "flwr"), *args], home=self.cli_home)

    def kill(self, proc: subprocess.Popen) -> None:
        """Kill one process (and its process group) now, as a crash would."""
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def run_status(self, run_id: int | None = None, wait: float = 60) -> str:
        """The status of the latest run (or ``run_id``) once finished (``flwr ls``)."""
        deadline = time.time() + wait
        status = "unknown"
        while time.time() < deadline:
            ls = self.flwr("ls", "loopback", "--format", "json", timeout=60)
            try:
                runs = json.loads(ls.stdout)["runs"]
            except (json.JSONDecodeError, KeyError):
                runs = []
            if run_id is not None:
                runs = [r for r in runs if int(r["run-id"]) == run_id]
            if runs:
                status = runs[-1]["status"]
                if status.startswith("finished"):
                    return status
            time.sleep(1)
        return status

    def close(self) -> None:
        """Kill every process started here and their children (each runs in its own process
        group, whose id is the PID we started; a SuperNode that already exited may have
        left its ``flower-superexec`` child behind, so every group is signalled)."""
        for proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            proc._log.close()  # type: ignore[attr-defined]
        deadline = time.time() + 15
        while time.time() < deadline and any(_group_alive(p.pid) for p in self.procs):
            time.sleep(0.5)
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Process groups started here that still have a live member."""
        return [p.pid for p in self.procs if _group_alive(p.pid)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

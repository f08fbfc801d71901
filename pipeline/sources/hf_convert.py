"""Hugging Face checkpoints: check a model folder before any work, describe its tensors by their
GGUF names, and convert it to the base GGUF with the pinned llama.cpp's convert_hf_to_gguf.py.

The converter runs as a subprocess of the venv's python with its own gguf-py first on the path
(the version it was written against). It converts lazily: safetensors are memory-mapped and
each tensor is materialized only while it is written, so the model is never in memory twice.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf

from pipeline.build.toolchain import convert_script, converter_root, user_source
from pipeline.errors import SqueezeError, did_you_mean
from pipeline.formats.model_info import ModelInfo, TensorInfo, synthetic_model_info
from pipeline.progress import bar
from pipeline.sources import hub

CONFIG = "config.json"
# Any one of these lets convert_hf_to_gguf.py build a vocabulary (sentencepiece, HF tokenizers, BPE).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")
# Files whose content defines the converted model (hashed by the runner, so an edit reconverts).
INPUT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                  "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                  "merges.txt")
OUTTYPES = {"F16": "f16", "BF16": "bf16", "F32": "f32"}
# Weight-holding prefixes that multimodal checkpoints put before the text model's tensor names.
TEXT_PREFIXES = ("language_model.", "model.language_model.")
# Checkpoints that keep each expert's matrices apart (`mlp.experts.3.down_proj.weight`); gguf-py
# names the stacked tensor from the name without the number (`mlp.experts.down_proj`).
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


# ---- the folder -----------------------------------------------------------------------------
def read_config(folder: Path, where: str = "") -> dict:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise SqueezeError(f"{where}{folder}: not a folder")
    if not path.is_file():
        raise SqueezeError(f"{where}{folder}: no {CONFIG} (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SqueezeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise SqueezeError(f"{path}:1: expected a JSON object")
    return config


def hf_architecture(config: dict, folder: Path) -> str:
    arches = config.get("architectures")
    if not arches or not isinstance(arches, list):
        raise SqueezeError(f"{Path(folder) / CONFIG}: no 'architectures' list (which transformers class is it?)")
    return str(arches[0])


def n_layers_of(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


def check_tokenizer(folder: Path, where: str = "") -> None:
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise SqueezeError(f"{where}{folder}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)} beside {CONFIG})")


def sentencepiece_warning(folder: Path) -> str | None:
    """llama.cpp's converter reads a sentencepiece vocabulary (Gemma, Llama 2, Mistral, Phi-3) from
    tokenizer.model. A folder holding only the tokenizer.json such a model was exported to (what
    transformers 5 saves) is converted as byte-level BPE with a guessed pre-tokenizer instead,
    which splits some text (runs of spaces) differently from the original: measured on Gemma 3
    270M, 47,985 tokens against 47,966 on 300k characters. The export keeps sentencepiece's
    byte fallback, which byte-level BPE never has: that is how the case is told apart."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        return None
    try:
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not model.get("byte_fallback"):
        return None
    return (f"warning: {folder} has a sentencepiece vocabulary (tokenizer.json with byte fallback) but no "
            "tokenizer.model; llama.cpp's converter then writes it as byte-level BPE, which tokenizes some text "
            "differently from the original: put the model's original tokenizer.model beside it for an exact "
            "vocabulary")


def folder_inputs(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in INPUT_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


# ---- what llama.cpp can convert -------------------------------------------------------------
def convertible_architectures(root: Path) -> dict[str, str]:
    """HF architecture name -> converter module, read (not imported: that needs torch) from the
    converter's `conversion/__init__.py` table, or from the `register(...)` calls of an older
    single-file convert_hf_to_gguf.py."""
    table = root / "conversion" / "__init__.py"
    if table.is_file():
        tree = ast.parse(table.read_text(encoding="utf-8"))
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
                return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                        if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    script = root / "convert_hf_to_gguf.py"
    return {name: "" for name in _registered_classes(ast.parse(script.read_text(encoding="utf-8")))}


def _registered_classes(tree: ast.Module) -> dict[str, list[ast.ClassDef]]:
    """HF names passed to `@<Model>.register("Name", ...)` -> the decorated classes (a
    multimodal name is registered twice: text model and vision projector)."""
    found: dict[str, list[ast.ClassDef]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "register":
                    for arg in dec.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            found.setdefault(arg.value, []).append(node)
    return found


def gguf_arch_of(root: Path, hf_arch: str, module: str) -> str | None:
    """The GGUF architecture ('gemma3') the converter writes for `hf_arch`, from the class's
    `model_arch = gguf.MODEL_ARCH.X`, following base classes defined in the same file."""
    path = root / "conversion" / f"{module}.py" if module else root / "convert_hf_to_gguf.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for node in _registered_classes(tree).get(hf_arch, []):
        member = _model_arch_member(node, classes)
        if member and member != "MMPROJ":  # the vision projector is a separate file
            known = getattr(gguf.MODEL_ARCH, member, None)
            return gguf.MODEL_ARCH_NAMES[known] if known is not None else member.lower()
    return None


def _model_arch_member(node: ast.ClassDef, classes: dict) -> str | None:
    """'GEMMA3' from `model_arch = gguf.MODEL_ARCH.GEMMA3` in the class or its nearest base."""
    seen = set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Attribute) and any(
                    isinstance(t, ast.Name) and t.id == "model_arch" for t in stmt.targets):
                return stmt.value.attr
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        node = next((classes[b] for b in bases if b in classes), None)
    return None


def check_convertible(hf_arch: str, folder: Path, root: Path, where: str = "") -> str:
    """The converter module for `hf_arch`, or one line naming the architecture it cannot convert."""
    known = convertible_architectures(root)
    if hf_arch not in known:
        which = "$SQUEEZE_LLAMA_CPP_SRC" if user_source() else "the pinned llama.cpp"
        raise SqueezeError(f"{where}architecture '{hf_arch}' (in {Path(folder) / CONFIG}) cannot be converted by "
                           f"{which}'s convert_hf_to_gguf.py{did_you_mean(hf_arch, known)}")
    return known[hf_arch]


# ---- tensor names before converting ---------------------------------------------------------
def safetensors_header(path: Path) -> dict:
    """Names, dtypes and shapes of a .safetensors file, from its JSON header (no weights read)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SqueezeError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise SqueezeError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise SqueezeError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header


def folder_tensors(folder: Path, arch: str, n_layers: int) -> tuple[TensorInfo, ...]:
    """The GGUF tensors the converter will write, named with gguf-py's own name map; shapes in
    ggml order (row length first). Tensors it does not map (vision towers) are left out."""
    march = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if march is None:
        return ()
    name_map = gguf.get_tensor_name_map(march, n_layers)
    out = {}
    experts: dict[str, set[int]] = {}  # merged GGUF name -> the expert numbers stacked into it
    for part in sorted(Path(folder).glob("*.safetensors")):
        for hf_name, meta in safetensors_header(part).items():
            shape = tuple(reversed([int(x) for x in meta["shape"]]))
            one_expert = PER_EXPERT.search(hf_name)
            if one_expert:  # the converter stacks these into one 3-D tensor, named without the number
                hf_name = PER_EXPERT.sub(".experts.", hf_name, count=1)
            gguf_name = _map_name(name_map, hf_name)
            if gguf_name is None:
                continue
            out[gguf_name] = TensorInfo(gguf_name, shape, None)
            if one_expert:
                experts.setdefault(gguf_name, set()).add(int(one_expert.group(1)))
    for name, numbers in experts.items():
        out[name] = TensorInfo(name, out[name].shape + (len(numbers),), None)  # ne2: the expert
    return tuple(out.values())


def _map_name(name_map, hf_name: str) -> str | None:
    candidates = [hf_name] + [hf_name[len(p):] for p in TEXT_PREFIXES if hf_name.startswith(p)]
    for cand in candidates:
        mapped = name_map.get_name(cand, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            return mapped
    return None


def folder_model_info(folder: Path, where: str = "", echo=print) -> ModelInfo:
    """Check a HF model folder the way the converter will read it, and describe its tensors."""
    config = read_config(folder, where)
    hf_arch = hf_architecture(config, folder)
    root = converter_root(echo)
    module = check_convertible(hf_arch, folder, root, where)
    check_tokenizer(folder, where)
    n_layers = n_layers_of(config)
    if n_layers is None:
        raise SqueezeError(f"{Path(folder) / CONFIG}: no num_hidden_layers (how many layers does the model have?)")
    arch = gguf_arch_of(root, hf_arch, module)
    if arch is None:
        raise SqueezeError(f"{where}cannot tell which GGUF architecture llama.cpp writes for '{hf_arch}'")
    tensors = folder_tensors(folder, arch, n_layers)
    if not tensors:  # weights not mappable by name here (other formats): names from the arch alone
        return synthetic_model_info(arch, n_layers)
    return ModelInfo(arch, n_layers, tensors)


def model_folder(recipe, source, download: bool) -> Path | None:
    """The local folder of a HF source; a hub model is downloaded when `download`, else looked up."""
    if source.kind == "hf-folder":
        return Path(source.ref)
    where = recipe.where("model", "source")
    if download:
        return hub.download_model(source.ref, source.revision, where=where)
    return hub.cached_model(source.ref, source.revision)


def hf_model_info(recipe, source) -> ModelInfo | None:
    """What model_source.model_info_for needs: None when a hub model is not downloaded yet."""
    folder = model_folder(recipe, source, download=False)
    if folder is None:
        return None
    return folder_model_info(folder, recipe.where("model", "source"))


# ---- converting -----------------------------------------------------------------------------
def missing_modules(folder: Path) -> list[str]:
    needed = ["torch", "transformers", "numpy"]
    if (Path(folder) / "tokenizer.model").is_file():
        needed.append("sentencepiece")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def convert_command(folder: Path, out: Path, base_type: str, script: Path) -> list[str]:
    # absolute paths: the converter runs in its own folder (it imports its `conversion` package)
    return [str(script), str(Path(folder).resolve()), "--outfile", str(Path(out).absolute()),
            "--outtype", OUTTYPES[base_type]]


# Runs the converter as __main__ and at exit writes its peak resident memory: VmHWM of its own
# address space. (ru_maxrss from wait4 would also count the parent's pages the child was forked
# with, so a big parent would inflate it.)
_PEAK_RSS_BOOT = """
import atexit, os, runpy, sys
def _peak():
    try:
        with open('/proc/self/status') as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
        with open(os.environ['SQUEEZE_PEAK_RSS_FILE'], 'w') as f:
            f.write(str(kib))
    except (OSError, StopIteration, KeyError, ValueError):
        pass
atexit.register(_peak)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(script)
runpy.run_path(script, run_name='__main__')
"""


def convert_env(script: Path) -> dict:
    """The converter imports its own gguf-py (it prepends it itself unless NO_LOCAL_GGUF is set;
    PYTHONPATH makes that hold for any module it starts too)."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    gguf_py = str(script.parent / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join([gguf_py] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_converter(folder: Path, out: Path, base_type: str, log_path: Path, echo=print) -> dict:
    """Run convert_hf_to_gguf.py; returns its peak resident memory. One line on failure."""
    missing = missing_modules(folder)
    if missing:
        raise SqueezeError(f"converting a Hugging Face model needs {', '.join(missing)} (not installed): "
                           f"pip install 'squeeze[convert]' (or make setup)")
    script = convert_script(echo)
    n_tensors = sum(len(safetensors_header(p)) for p in Path(folder).glob("*.safetensors"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = convert_command(folder, out, base_type, script)
    peak_file = log_path.with_name(log_path.name + ".peak-rss")
    peak_file.unlink(missing_ok=True)
    env = dict(convert_env(script), SQUEEZE_PEAK_RSS_FILE=str(peak_file))
    last_error = ""
    with open(log_path, "w", encoding="utf-8") as log, bar(n_tensors or None, "convert", unit="tensor") as progress:
        log.write(f"{sys.executable} " + " ".join(args) + "\n")
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_BOOT, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=script.parent, errors="replace")
        for line in proc.stdout:
            log.write(line)
            if " --> " in line:  # the converter logs one such line per tensor it writes
                progress.update(1)
            if line.startswith(("ERROR", "Traceback")) or "Error" in line.split(":", 1)[0]:
                last_error = line.strip()
        proc.stdout.close()
        proc.wait()
    if proc.returncode != 0:
        detail = last_error or _last_line(log_path)
        raise SqueezeError(f"convert_hf_to_gguf.py failed on {folder} (exit {proc.returncode}): {detail} "
                           f"(log: {log_path})")
    try:
        peak = round(int(peak_file.read_text()) / 1024, 1)
        peak_file.unlink()
    except (OSError, ValueError):
        peak = None  # no /proc (macOS): not measured
    return {"peak_rss_mib": peak, "converter": str(script)}


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def convert_to_base(recipe, source, out: Path, log_path: Path, echo=print) -> dict:
    """Convert a HF folder or hub model (downloaded first) to the base GGUF at `out`."""
    folder = model_folder(recipe, source, download=True)
    folder_model_info(folder, recipe.where("model", "source"))  # the same checks as `plan`
    warning = sentencepiece_warning(folder)
    if warning:
        echo(warning)
    base_type = recipe.model.base_type.upper()
    extra = run_converter(folder, out, base_type, log_path)
    extra["folder"] = str(folder)
    if source.kind == "hub":
        extra["hub_commit"] = hub.commit_of(source.ref, source.revision)
    return extra

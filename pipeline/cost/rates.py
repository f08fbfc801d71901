"""How fast this machine does each kind of work a run is made of, measured by a short probe and
cached: the rates `squeeze plan --estimate` turns a model's shape into seconds with.

The probe runs squeeze's own code paths (llama.cpp's prompt processing and token generation,
llama_model_quantize, the calibration pass with its eval hook, the base-distribution sketch and
the KLD scoring, gguf-py's dequantization) on a small synthetic model written with gguf-py (a
llama-architecture F16 GGUF of random weights with a byte-level vocabulary), so it needs no
download and measures the same thing on every machine. Its figures are per unit of work (FLOP,
weight, vocabulary entry, byte), which estimate.py scales to the model at hand.

Rates are cached under squeeze's cache (`rates/`), keyed by the engine version, its build flags,
the CPU and the thread count; a different key measures again (about half a minute).

Thread scaling. An estimate for another host (`--cpu-threads N`, or the default host of a
`--gpu` class) needs to know how each kind of CPU work grows with threads. The probe measures the
kinds that run on several threads (llama.cpp's prompt processing and token generation, ggml's
quantize, squeeze's numpy work over the vocabulary) with the process pinned to 1 and then 2 of
this machine's CPUs, and records each kind's parallel fraction p from Amdahl's law:
    speedup S(n) = t(1) / t(n) = 1 / ((1 - p) + p / n),  so from two points  p = 2 (1 - t(2) / t(1))
(clamped to 0..1). A rate measured here at T threads is priced at N threads as
rate x S(N) / S(T). Two points fit one parameter; the memory bandwidth a 32-thread host shares
is not in them, so the extrapolation is an upper bound on speed for bandwidth-bound work.

Load. The probe records the 1-minute load average before and after it ran, the CPU count, and,
where /proc/stat exists, the CPUs other work used while it ran: the machine's busy CPU time over
the probe less the probe's own (other_cpus). Above BUSY_CPU_SHARE x CPUs of that, the machine was
busy. (The load average alone misjudged: it lags by a minute, so a job that kept one core of two
busy throughout read as the probe's own earlier try.) Without /proc/stat, other work is the larger
of the load before and the load after less the probe's own threads, busy above BUSY_SHARE x CPUs.
A busy probe says so in one line and measures again (MAX_TRIES in all); rates still measured
busy serve that process's estimates, with a note, and are not cached. A rate that comes out zero
or not finite (a busy machine makes the subtractions below go negative) is never cached: the
estimate refuses in one line, and a cached record holding one is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from pipeline.choose.gptq_rounding import gptq_rows, inverse_factor
from pipeline.choose.groups import CANDIDATE_TYPES
from pipeline.engine.backend import default_threads, engine_versions
from pipeline.build.build_flags import flags_id
from pipeline.engine.context import Context
from pipeline.engine.ggml_quant import quantize_rows, round_trip
from pipeline.engine.model import Model
from pipeline.engine.quantize import quantize_file
from pipeline.errors import SqueezeError
from pipeline.formats.dequantize import dequantize_gguf
from pipeline.formats.imatrix_file import write_imatrix
from pipeline.fsutil import atomic_path, cache_dir, write_json_atomic
from pipeline.measure import calibration, perplexity, speed

# Of the cached record; bump when the benchmark measures differently (6: load as CPU time, scaling
# in rounds; 8: the process's own memory from a fresh interpreter, not from the caller; 9: numpy's
# matrix products and GPTQ's column rounding).
RATES_FORMAT = 9

# The synthetic probe model: wide enough that matrix products dominate, small enough to build in
# a few seconds (about 49M parameters, 98 MB in F16).
BENCH_DIMS = {"n_embd": 768, "n_ff": 2048, "n_layers": 4, "n_head": 12, "n_head_kv": 4, "n_vocab": 32000}
BENCH_QUANT = "Q4_K_M"
BENCH_PP = 256  # tokens per prompt-processing batch
BENCH_TG = 16  # single-token decodes
BENCH_REPS = 3  # timed runs of each (after a warm-up)
BENCH_CTX = 512  # context of the calibration and scoring probes (as the recipes use it) ...
BENCH_CHUNKS = 4  # ... and chunks: one decode of 2048 tokens, llama-perplexity's batch
# Types whose dequantization speed (gguf-py, numpy) is measured: what sources usually hold.
DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class Rates:
    key: dict
    pp_flops_f16: float  # FLOP/s of prompt processing, F16 weights
    pp_flops_quant: float  # FLOP/s of prompt processing, quantized weights (BENCH_QUANT)
    tg_bytes_per_s: float  # weight bytes read per second in token generation (quantized)
    quantize_weights_per_s: dict  # weights/s through llama_model_quantize: "Q8_0", "legacy", "K" types
    dequantize_values_per_s: dict  # ggml type -> values/s through gguf-py's dequantize
    write_bytes_per_s: float  # streaming a file to disk (page cache included, as a run does)
    hook_values_per_s: float  # activation values/s the calibration eval hook copies and sums
    sketch_s_per_entry: float  # numpy seconds per (token x vocabulary entry), score base
    kld_s_per_entry: float  # numpy seconds per (token x vocabulary entry), score variant
    process_rss_bytes: int  # squeeze's own resident memory before any model is loaded
    load_s: float = 0.0  # opening a model and creating a context: fixed cost per step that evaluates
    header_s_per_token: float = 0.0  # gguf-py reading and rewriting a GGUF header, per vocabulary entry
    probe_seconds: float = 0.0
    measured: str = ""
    notes: dict = field(default_factory=dict)
    # ggml type -> weights/s through ggml_quantize_chunk and back in memory (the sensitivity map's
    # weight errors and every in-memory probe's quantized tensors), at `threads`
    roundtrip_weights_per_s: dict = field(default_factory=dict)
    # kind ("pp", "tg", "quantize", "vocab") -> {"seconds_1", "seconds_2", "parallel_fraction"};
    # empty where this machine cannot pin threads (not Linux, or one CPU)
    scaling: dict = field(default_factory=dict)
    # FLOP/s of the output layer for the tokens whose logits are read (writing the logits out
    # included): a decode asking for every token's logits against one asking for the last only
    output_flops: float = 0.0
    # {"before": [1, 5, 15 min], "after": [...], "nproc", "threads", "other", "other_cpus", "busy", "tries"}
    load: dict = field(default_factory=dict)
    # FLOP/s of numpy's float64 matrix products (its BLAS, at its own threads): the second
    # moments' x^T x and GPTQ's factors and feedback
    dense_flops: float = 0.0
    # seconds per value GPTQ rounds column by column in 256-wide blocks (its largest: the
    # feedback inside a block grows with the block), the products past each block not included
    gptq_s_per_value: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def threads(self) -> int:
        return int(self.key.get("threads") or 1)

    def parallel_fraction(self, kind: str) -> float | None:
        entry = self.scaling.get(kind)
        return None if entry is None else float(entry["parallel_fraction"])

    def thread_factor(self, kind: str, threads: int | None) -> float:
        """How much faster `kind` of work runs at `threads` than at the threads it was measured
        at here (Amdahl's law with this machine's parallel fraction; 1 when not measured)."""
        p = self.parallel_fraction(kind)
        if threads is None or p is None or threads == self.threads:
            return 1.0
        return amdahl_speedup(p, threads) / amdahl_speedup(p, self.threads)


# ---- thread scaling and load: pure arithmetic ---------------------------------------------------
def parallel_fraction(seconds_1: float, seconds_2: float) -> float:
    """Amdahl's parallel fraction from the same work timed on 1 and on 2 threads:
    t2 / t1 = (1 - p) + p / 2, so p = 2 (1 - t2 / t1); clamped to 0..1 (noise can cross either)."""
    if not (seconds_1 > 0 and seconds_2 > 0 and math.isfinite(seconds_1) and math.isfinite(seconds_2)):
        raise SqueezeError(f"thread scaling: times of {seconds_1!r} s and {seconds_2!r} s give no speedup")
    return min(1.0, max(0.0, 2.0 * (1.0 - seconds_2 / seconds_1)))


def amdahl_speedup(p: float, threads: int) -> float:
    """S(n) = 1 / ((1 - p) + p / n)."""
    return 1.0 / ((1.0 - p) + p / max(1, int(threads)))


# The machine was busy when other work kept more than this share of its CPUs runnable (load
# average), or used more than this share of its CPU time while the probe ran (/proc/stat): a
# quiet machine's daemons use a few hundredths.
BUSY_SHARE = 0.5
BUSY_CPU_SHARE = 0.15
MAX_TRIES = 2


def other_load(before: float, after: float, own_threads: int, retry: bool = False) -> float:
    """The 1-minute load other work put on the machine around the probe: the load before it
    started (less its own threads on a retry: the try just before still weighs in the average),
    or after it less its own threads (they kept up to that many runnable; the 1-minute average
    lags, so subtracting all of them is lenient), whichever is larger."""
    return max(float(before) - (own_threads if retry else 0), float(after) - own_threads, 0.0)


def is_busy(before: float, after: float, nproc: int, own_threads: int, retry: bool = False) -> bool:
    return other_load(before, after, own_threads, retry) > BUSY_SHARE * max(1, nproc)


def other_cpus(machine_busy_s: float, own_s: float, wall_s: float) -> float:
    """CPUs' worth of other work while the probe ran: the machine's busy CPU seconds over that
    time less the probe's own, per wall second."""
    return max(machine_busy_s - own_s, 0.0) / max(wall_s, 1e-9)


def cpu_seconds() -> tuple[float, float] | None:
    """(the machine's busy CPU seconds since boot, this process's CPU seconds and those of the
    children it has waited for), or None where the kernel gives no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy; steal
    # (another guest on the host) slows the probe just the same
    busy = sum(fields[:8]) - fields[3] - fields[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def bad_rates(data: dict) -> list[str]:
    """The rates of a record (Rates.to_json()) that are zero, negative or not finite: what a
    busy or broken probe leaves, and what no estimate may be made from."""
    bad = []
    for name in ("pp_flops_f16", "pp_flops_quant", "output_flops", "tg_bytes_per_s", "write_bytes_per_s",
                 "hook_values_per_s", "sketch_s_per_entry", "kld_s_per_entry", "dense_flops", "gptq_s_per_value"):
        v = data.get(name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            bad.append(name)
    for name in ("quantize_weights_per_s", "dequantize_values_per_s", "roundtrip_weights_per_s"):
        values = data.get(name)
        if not isinstance(values, dict) or not values:
            bad.append(name)
            continue
        bad += [f"{name}[{k}]" for k, v in values.items()
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
    return bad


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rates_key(threads: int | None) -> dict:
    return {"format": RATES_FORMAT, **engine_versions(), "flags": flags_id(), "cpu": cpu_name(),
            "cores": os.cpu_count(), "threads": threads or default_threads()}


def rates_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("rates") / f"rates-{digest}.json"


def rates_from_record(data: dict, key: dict) -> Rates | None:
    """A cached record as Rates, or None when it is for another key, of another format, or holds
    a rate no estimate may use (zero or not finite: measured again)."""
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)) or bad_rates(data):
        return None
    try:
        return Rates(**data)
    except TypeError:
        return None


def cached_rates(threads: int | None) -> Rates | None:
    key = rates_key(threads)
    try:
        data = json.loads(rates_path(key).read_text())
    except (OSError, ValueError):
        return None
    return rates_from_record(data, key)


def machine_rates(threads: int | None = None, echo=print) -> Rates:
    """This machine's rates: from the cache when measured before with the same key, else probed
    (again when the machine was busy, MAX_TRIES in all); a zero or non-finite rate is refused."""
    found = cached_rates(threads) or _busy_rates.get(rates_path(rates_key(threads)))
    if found is not None:
        return found
    echo("measuring this machine's rates (once per engine version, CPU and thread count) ...")
    for attempt in range(1, MAX_TRIES + 1):
        rates = benchmark(threads, retry=attempt > 1)
        rates.load["tries"] = attempt
        bad = bad_rates(rates.to_json())
        if not bad and not rates.load["busy"]:
            break
        if attempt < MAX_TRIES:
            why = f"measured {', '.join(bad)} as zero or not finite" if bad else "ran on a busy machine"
            echo(f"warning: the rate benchmark {why} ({load_text(rates.load)}); measuring again")
    if bad:
        raise SqueezeError(f"the rate benchmark measured {', '.join(bad)} as zero or not finite "
                           f"({load_text(rates.load)}); not cached: rerun on a quieter machine")
    if rates.load["busy"]:
        # Used for this process's estimates only: cached, they would make every later one slow.
        echo(f"warning: the machine was still busy ({load_text(rates.load)}); these rates are used for this "
             "estimate only, not cached, and times may come out slow")
        _busy_rates[rates_path(rates.key)] = rates
        return rates
    write_json_atomic(rates_path(rates.key), rates.to_json())
    return rates


# Rates a busy probe measured, kept for the rest of this process instead of the cache (by the
# cache file they would have had).
_busy_rates: dict[Path, Rates] = {}


def load_text(load: dict) -> str:
    others = f"other work used {load['other_cpus']:.2f} CPUs, " if load.get("other_cpus") is not None else ""
    return (f"{others}1-min load {load['before'][0]:.2f} before, {load['after'][0]:.2f} after, on {load['nproc']} "
            f"CPUs with {load['threads']} probe threads")


# ---- the synthetic model ---------------------------------------------------------------------
def bench_flops_per_token(dims: dict) -> float:
    """2 FLOP per block weight a token passes through: prompt processing, as timed, runs the
    output layer for the last token alone, so the rate is a rate of block work (the output layer
    is priced apart, at output_flops, for the tokens whose logits a step reads)."""
    return 2.0 * (bench_params(dims) - bench_output_params(dims))


def bench_output_params(dims: dict) -> int:
    """The output layer's weights: the embedding, tied."""
    return dims["n_vocab"] * dims["n_embd"]


def bench_params(dims: dict) -> int:
    e, ff, nl, hd = dims["n_embd"], dims["n_ff"], dims["n_layers"], dims["n_embd"] // dims["n_head"]
    kv = dims["n_head_kv"] * hd
    return dims["n_vocab"] * e + nl * (2 * e * e + 2 * e * kv + 3 * e * ff)


def write_bench_model(path: Path, dims: dict = BENCH_DIMS, seed: int = 0) -> None:
    """A llama-architecture F16 GGUF of random weights (output tied to the embedding) and a
    byte-level sentencepiece vocabulary: any text tokenizes (one token per byte)."""
    rng = np.random.default_rng(seed)
    e, ff, nl, nh, nkv, nv = (dims[k] for k in ("n_embd", "n_ff", "n_layers", "n_head", "n_head_kv", "n_vocab"))
    hd = e // nh
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name("squeeze rate probe (random weights)")
        w.add_context_length(4096)
        w.add_embedding_length(e)
        w.add_block_count(nl)
        w.add_feed_forward_length(ff)
        w.add_head_count(nh)
        w.add_head_count_kv(nkv)
        w.add_rope_dimension_count(hd)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        specials = ["<unk>", "<s>", "</s>"]
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        filler = [f"\u2581w{i}" for i in range(nv - len(specials) - len(byte_tokens))]
        w.add_tokenizer_model("llama")
        w.add_token_list(specials + byte_tokens + filler)
        w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(filler))])
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(filler))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)

        def dense(rows, cols):
            return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

        w.add_tensor("token_embd.weight", dense(nv, e))
        w.add_tensor("output_norm.weight", np.ones(e, np.float32))
        for i in range(nl):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(e, np.float32))
            w.add_tensor(p + "attn_q.weight", dense(e, e))
            w.add_tensor(p + "attn_k.weight", dense(nkv * hd, e))
            w.add_tensor(p + "attn_v.weight", dense(nkv * hd, e))
            w.add_tensor(p + "attn_output.weight", dense(e, e))
            w.add_tensor(p + "ffn_norm.weight", np.ones(e, np.float32))
            w.add_tensor(p + "ffn_gate.weight", dense(ff, e))
            w.add_tensor(p + "ffn_up.weight", dense(ff, e))
            w.add_tensor(p + "ffn_down.weight", dense(e, ff))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def bench_text(n_bytes: int, seed: int = 0) -> str:
    """Words of random letters: with the byte-level vocabulary, about one token per character."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(n_bytes // 5)]
    return " ".join(words)


# ---- the probe ------------------------------------------------------------------------------
def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# What a `squeeze run` process has loaded before its first model: the CLI, every stage, the engine.
_BASELINE_CODE = ("import pipeline.cli, pipeline.stages.registry; from pipeline.engine.backend import init_backend; "
                  "init_backend(); from pipeline.cost.rates import _rss_bytes; print(_rss_bytes())")


def baseline_rss_bytes() -> int:
    """squeeze's own resident memory before any model is loaded, read in a fresh interpreter: the
    process that asks for the rates may hold models and arrays of its own (a test session, a
    benchmark script), which say nothing of a run's. (Measured in the process that asked, every
    size of a scale benchmark was over-predicted by that process's 1.7 GiB.)"""
    try:
        done = subprocess.run([sys.executable, "-c", _BASELINE_CODE], capture_output=True, text=True, timeout=300)
        return int(done.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return _rss_bytes()


def _dequantize_rates(rng: np.random.Generator) -> dict:
    out = {}
    n_values = 1 << 20
    for name in DEQUANT_TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(n_values // block) * size, dtype=np.uint8)
        if name == "F32":
            raw = rng.standard_normal(n_values).astype(np.float32).view(np.uint8)
        elif name in ("F16", "BF16"):
            raw = (rng.standard_normal(n_values).astype(np.float32) * 0.02).astype(np.float16).view(np.uint8)
        with np.errstate(all="ignore"):  # random bytes make some scales inf/nan: speed is the same
            seconds, _ = _timed(lambda: gguf.quants.dequantize(raw, qtype).astype(np.float16))
        out[name] = n_values / max(seconds, 1e-9)
    return out


def _write_rate(folder: Path) -> float:
    data = np.random.default_rng(1).integers(0, 256, size=64 << 20, dtype=np.uint8)
    path = folder / f".write-probe-{os.getpid()}"
    try:
        seconds, _ = _timed(lambda: path.write_bytes(data.tobytes()))
    finally:
        path.unlink(missing_ok=True)
    return data.nbytes / max(seconds, 1e-9)


HEADER_VOCAB = 262144  # the header probe's vocabulary: the largest common one (Gemma 3's)


def _header_cost(folder: Path, deq: dict, write: float) -> float:
    """What a GGUF-to-base conversion costs beyond dequantizing and writing: reading the header,
    vocabulary included, and writing it again (the origin check's parse is cached model info).
    Measured on the real dequantize_gguf of a header-only GGUF with HEADER_VOCAB entries; per
    vocabulary entry. (With gguf-py's reader this was about 10 s at 262k entries; squeeze's own
    parser copies the entries as raw bytes.)"""
    src = folder / f"header-{HEADER_VOCAB}.gguf"
    if not src.exists():
        with atomic_path(src) as tmp:
            w = gguf.GGUFWriter(str(tmp), "llama")
            w.add_block_count(1)
            w.add_tokenizer_model("llama")
            w.add_token_list([f"t{i}" for i in range(HEADER_VOCAB)])
            w.add_token_scores([0.0] * HEADER_VOCAB)
            w.add_token_types([1] * HEADER_VOCAB)
            w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    out = folder / f".dequant-probe-{os.getpid()}.gguf"
    try:
        seconds, _ = _timed(lambda: dequantize_gguf(src, out, "F16"))
        seconds -= out.stat().st_size / write
    finally:
        out.unlink(missing_ok=True)
    return max(seconds, 0.0) / HEADER_VOCAB


def _quantize_rates(f16: Path, out_dir: Path, imatrix: Path, threads: int) -> dict:
    """Weights/s through llama_model_quantize with an importance matrix, by kind of type: Q8_0
    (rounding only), the legacy block types (Q4_0 ... Q5_1, IQ4_NL: a weighted scale search) and
    the K/IQ types (a search per sub-block), on the probe model (embedding included)."""
    n = bench_params(BENCH_DIMS)
    rates = {}
    for kind, ftype in (("Q8_0", "Q8_0"), ("legacy", "Q5_0"), ("K", "Q4_K_M")):
        dst = out_dir / f".quantize-probe-{os.getpid()}.gguf"
        try:
            # token_embd (tied output) would be Q6_K otherwise: keep every tensor of one kind
            embd = {"Q8_0": "Q8_0", "legacy": "Q5_0", "K": "Q6_K"}[kind]
            seconds, _ = _timed(lambda: quantize_file(f16, dst, ftype, imatrix_path=imatrix,
                                                      token_embedding_type=embd, threads=threads))
        finally:
            dst.unlink(missing_ok=True)
        rates[kind] = n / seconds
    return rates


# The thread-scaling kernels: a matrix of this many rows x columns quantized (Q4_K with column
# weights, as with an imatrix), and logits of this many rows over the largest common vocabulary.
SCALING_QUANT_ROWS, SCALING_QUANT_COLS = 2048, 4096
SCALING_VOCAB_ROWS = 256
SCALING_ROUNDS = 3
ROUNDTRIP_ROWS = 128  # rows of SCALING_QUANT_COLS per candidate type's round-trip rate


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not every platform has one
        return [0.0, 0.0, 0.0]


def _pin(cpus: set[int]) -> None:
    """Every thread of this process on `cpus` (threads started later inherit it): llama.cpp's,
    and the numpy and quantize pools, which are sized by os.cpu_count() and keep that size."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def _best_of(n: int, fn) -> float:
    return min(_timed(fn)[0] for _ in range(n))


def _scaling_kernels(model: Model, threads: int, rng: np.random.Generator) -> dict[str, float]:
    """Seconds of each kind of multi-threaded work, with `threads` llama.cpp threads."""
    tests = speed.measure(model, BENCH_PP, BENCH_TG, BENCH_REPS, threads)["tests"]
    mat = rng.standard_normal((SCALING_QUANT_ROWS, SCALING_QUANT_COLS), dtype=np.float32)
    weights = rng.random(SCALING_QUANT_COLS, dtype=np.float32) + 0.5
    logits = rng.standard_normal((SCALING_VOCAB_ROWS, HEADER_VOCAB), dtype=np.float32) * 3

    def vocab():  # score_against_base's per-row work: the pooled log-sum-exp, the serial argmax
        perplexity.log_sum_exp_rows(logits)
        logits.argmax(axis=1)

    return {"pp": 1.0 / max(tests[f"pp{BENCH_PP}"]["samples"]), "tg": 1.0 / max(tests[f"tg{BENCH_TG}"]["samples"]),
            "quantize": _timed(lambda: quantize_rows(mat, "Q4_K", weights))[0], "vocab": _best_of(2, vocab)}


def measure_scaling(model: Model) -> dict:
    """Each kind's seconds on 1 and on 2 of this machine's CPUs and its parallel fraction (module
    docstring); {} where threads cannot be pinned (no sched_setaffinity, or fewer than 2 CPUs)."""
    if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
        return {}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return {}
    # Rounds alternate the order (1, 2), (2, 1), ... and each kind keeps its best time: a moment of
    # other work then spoils one round, not the fraction (which hangs on the ratio of two times).
    seconds: dict[int, dict[str, float]] = {}
    try:
        for r in range(SCALING_ROUNDS):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                _pin(set(allowed[:n]))
                times = _scaling_kernels(model, n, np.random.default_rng(n))
                seconds[n] = {k: min(v, seconds.get(n, {}).get(k, math.inf)) for k, v in times.items()}
    finally:
        _pin(set(allowed))
    return {kind: {"seconds_1": round(seconds[1][kind], 5), "seconds_2": round(seconds[2][kind], 5),
                   "parallel_fraction": round(parallel_fraction(seconds[1][kind], seconds[2][kind]), 3)}
            for kind in seconds[1]}


DENSE_ROWS, DENSE_COLS = 2048, 1024  # x^T x of 2048 tokens of a 1024-wide input
GPTQ_ROWS, GPTQ_COLS = 512, 256  # one 256-wide K-quant block of columns: no products past it


def _dense_rates(rng: np.random.Generator) -> tuple[float, float]:
    """(FLOP/s of numpy's float64 x^T x, seconds per value of GPTQ's column rounding)."""
    x = rng.standard_normal((DENSE_ROWS, DENSE_COLS))
    dense = 2.0 * DENSE_ROWS * DENSE_COLS ** 2 / max(_best_of(3, lambda: x.T @ x), 1e-9)
    h = x[:, :GPTQ_COLS].T @ x[:, :GPTQ_COLS]
    factor = inverse_factor(h)
    w = rng.standard_normal((GPTQ_ROWS, GPTQ_COLS), dtype=np.float32)
    seconds = _best_of(2, lambda: gptq_rows(w, "Q4_K", h, factor=factor))
    return dense, seconds / (GPTQ_ROWS * GPTQ_COLS)


def _roundtrip_rates(rng: np.random.Generator) -> dict[str, float]:
    """Weights/s of a quantize-and-back in memory for each candidate type (at every core, with
    column weights): the i-quants search grids and are several times slower than the K-quants."""
    mat = rng.standard_normal((ROUNDTRIP_ROWS, SCALING_QUANT_COLS), dtype=np.float32)
    weights = rng.random(SCALING_QUANT_COLS, dtype=np.float32) + 0.5
    return {t: mat.size / max(_best_of(2, lambda: round_trip(mat, t, weights)), 1e-9) for t in CANDIDATE_TYPES}


def benchmark(threads: int | None = None, retry: bool = False) -> Rates:
    """Measure the rates (about half a minute on 2 cores; the probe files are built once)."""
    start = time.perf_counter()
    threads = threads or default_threads()
    load_before, cpu_before = _loadavg(), cpu_seconds()
    rss = baseline_rss_bytes()
    folder = cache_dir("probe")
    digest = hashlib.sha256(json.dumps(BENCH_DIMS, sort_keys=True).encode()).hexdigest()[:10]
    f16 = folder / f"probe-{digest}-f16.gguf"
    if not f16.exists():
        write_bench_model(f16)
    quant = folder / f"probe-{digest}-{BENCH_QUANT.lower()}.gguf"
    if not quant.exists():
        quantize_file(f16, quant, BENCH_QUANT, threads=threads)
    n_params = bench_params(BENCH_DIMS)
    flops = bench_flops_per_token(BENCH_DIMS)
    nv = BENCH_DIMS["n_vocab"]
    # the calibration and scoring probes run the real workload's shape: BENCH_CHUNKS chunks of
    # BENCH_CTX tokens in one decode
    n_tok = BENCH_CHUNKS * BENCH_CTX

    with Model(f16) as model:
        text = bench_text(2 * n_tok)
        tokens = model.tokenize(text)
        chunks = perplexity.make_chunks(model, text, BENCH_CTX, BENCH_CHUNKS)
        n_seq = min(perplexity.seqs_per_batch(BENCH_CTX), BENCH_CHUNKS)
        with Context(model, BENCH_CTX, n_seq, threads) as c:
            # the numpy work alone is timed (a difference of two timed decodes is noise on a busy machine)
            sketch_spent: dict = {}
            dist = perplexity.base_distribution(model, c, chunks, spent=sketch_spent)
            # prompt processing as the workload runs it (n_seq chunks in one decode, not one short
            # prompt: ~10x the work, so a timer's and a scheduler's jitter weigh less), first with
            # the last token's logits alone (the blocks' work), then with every token's
            seqs = list(chunks.tokens[:n_seq])
            last = _best_of(BENCH_REPS, lambda: c.eval(seqs, output_last_only=True))
            every = _best_of(BENCH_REPS, lambda: c.eval(seqs))
            pp_f16 = n_seq * BENCH_CTX * flops / last
            n_out = n_seq * (BENCH_CTX - 1)
            output_rate = n_out * 2.0 * bench_output_params(BENCH_DIMS) / max(every - last, 1e-3 * every)
    # calibration: the forward pass plus the eval hook that copies and sums every matmul input
    cal_s, (totals, _) = _timed(lambda: calibration.collect(f16, tokens, BENCH_CTX, BENCH_CHUNKS, threads=threads,
                                                            progress_desc="probe"))
    hook_values = n_tok * hooked_values_per_token(BENCH_DIMS)
    hook_rate = hook_values / max(cal_s - n_tok * flops / pp_f16, 0.05 * cal_s)
    scored = chunks.tokens.shape[0] * chunks.n_scored
    sketch = sketch_spent["numpy_s"] / (scored * nv)
    imatrix = folder / f".probe-imatrix-{os.getpid()}.gguf"
    write_imatrix(imatrix, calibration.to_imatrix(totals, BENCH_CTX, ["probe"]))
    try:
        quantize = _quantize_rates(f16, folder, imatrix, threads)
    finally:
        imatrix.unlink(missing_ok=True)

    def load():
        with Model(quant) as m, Context(m, BENCH_CTX, 1, threads):
            pass
    load()  # the first open pays for reading the file; a step's model is usually in the page cache
    load_s, _ = _timed(load)

    with Model(quant) as model:
        sp = speed.measure(model, BENCH_PP, BENCH_TG, BENCH_REPS, threads)["tests"]
        tg_s_per_token = 1.0 / sp[f"tg{BENCH_TG}"]["mean"]
        qbytes = model.size_bytes
        with Context(model, BENCH_CTX, n_seq, threads) as c:
            kld_spent: dict = {}
            perplexity.score_against_base(model, c, dist, spent=kld_spent)
            pp_q = n_seq * BENCH_CTX * flops / _best_of(BENCH_REPS, lambda: c.eval(seqs, output_last_only=True))
        scaling = measure_scaling(model)
    kld = kld_spent["numpy_s"] / (scored * nv)
    # a single-token decode reads every weight once: bandwidth-bound (its fixed cost folded in)
    tg_rate = qbytes / tg_s_per_token

    rng = np.random.default_rng(0)
    deq = _dequantize_rates(rng)
    roundtrip = _roundtrip_rates(rng)
    dense, gptq = _dense_rates(rng)
    write = _write_rate(folder)
    header = _header_cost(folder, deq, write)
    load_after, cpu_after = _loadavg(), cpu_seconds()
    nproc = os.cpu_count() or 1
    others = None
    if cpu_before is not None and cpu_after is not None:
        others = round(other_cpus(cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1],
                                  time.perf_counter() - start), 2)
    busy = (others > BUSY_CPU_SHARE * nproc if others is not None
            else is_busy(load_before[0], load_after[0], nproc, threads, retry))
    load = {"before": load_before, "after": load_after, "nproc": nproc, "threads": threads,
            "other": round(other_load(load_before[0], load_after[0], threads, retry), 2),
            "other_cpus": others, "busy": busy, "tries": 1}
    return Rates(
        key=rates_key(threads), pp_flops_f16=pp_f16, pp_flops_quant=pp_q, output_flops=output_rate,
        tg_bytes_per_s=tg_rate,
        quantize_weights_per_s=quantize, dequantize_values_per_s=deq,
        write_bytes_per_s=write, hook_values_per_s=hook_rate, sketch_s_per_entry=sketch, kld_s_per_entry=kld,
        process_rss_bytes=rss, load_s=load_s, header_s_per_token=header,
        probe_seconds=round(time.perf_counter() - start, 1), measured=time.strftime("%Y-%m-%d %H:%M:%S"),
        roundtrip_weights_per_s=roundtrip, scaling=scaling, load=load, dense_flops=dense, gptq_s_per_value=gptq,
        notes={"probe_model": {**BENCH_DIMS, "params": n_params, "quant": BENCH_QUANT, "quant_bytes": qbytes},
               "pp_tokens": BENCH_PP, "tg_tokens": BENCH_TG, "ctx": BENCH_CTX, "chunks": BENCH_CHUNKS,
               "header_vocab": HEADER_VOCAB})


def hooked_values_per_token(dims_or_shape) -> int:
    """Activation values the calibration hook reads per token: the input row of every block matmul."""
    if isinstance(dims_or_shape, dict):
        e, ff, nl = dims_or_shape["n_embd"], dims_or_shape["n_ff"], dims_or_shape["n_layers"]
        return nl * (6 * e + ff)  # q, k, v, output, gate, up read n_embd; down reads n_ff
    return int(dims_or_shape)


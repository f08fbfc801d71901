"""A step that writes a large file first checks the disk has room: on a full disk the run stops
with one line naming the step, the folder, the bytes it needs and the bytes free, and leaves
nothing half-written. The full disk is real: a small tmpfs (mounting needs root; skipped without)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.cost.rates import write_bench_model
from pipeline.errors import SqueezeError
from pipeline.fsutil import PARTIAL_MARK, ensure_free_space

SMALL = {"n_embd": 256, "n_ff": 768, "n_layers": 4, "n_head": 4, "n_head_kv": 2, "n_vocab": 4096}  # 8.6 MB F16


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB filesystem of its own (tmpfs), unmounted afterwards."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'needs root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_ensure_free_space_compares_with_the_real_free_bytes(small_disk):
    free = 6 << 20
    with pytest.raises(SqueezeError) as exc:
        ensure_free_space("quantize Q4_K_M", small_disk / "variants", 1 << 20)  # the margin alone is 16 MiB
    message = str(exc.value)
    assert message.startswith(f"quantize Q4_K_M: not enough disk space in {small_disk / 'variants'}: ")
    assert "writes about 1.0 MiB" in message and f"{free / (1 << 20):.1f} MiB free" in message
    assert "\n" not in message
    ensure_free_space("quantize Q4_K_M", Path("/"), 1 << 20)  # the root disk has room


def test_a_full_disk_stops_convert_before_it_writes(small_disk, tmp_path):
    source = tmp_path / "small.gguf"
    write_bench_model(source, SMALL)  # F16 already: the base would be a copy of ~8.6 MB
    recipe = tmp_path / "small.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {source}, base_type: F16}}
        variants: {{Q8_0: Q8_0}}
        score: {{ctx: 128, chunks: 2}}
        """))
    results = small_disk / "results"
    out = CliRunner().invoke(main, ["run", str(recipe), "--results", str(results)])
    assert out.exit_code == 1
    lines = [ln for ln in out.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, out.output
    assert lines[0].startswith(f"Error: convert: not enough disk space in {results}: it writes about 8.")
    assert lines[0].endswith(" free")
    written = [p.name for p in results.rglob("*") if p.is_file()] if results.exists() else []
    assert not [n for n in written if n.endswith(".gguf") or PARTIAL_MARK in n], written

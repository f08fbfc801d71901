"""Freed heap memory goes back to the system between steps (pipeline.run.heap)."""

import subprocess
import sys
import textwrap

import pytest

from pipeline.run.heap import _malloc_trim

# What both children run first: `fragment()` fills ~300 MiB of heap with 100 kB buffers (below
# glibc's mmap threshold, so they live in the heap) and frees all but every 50th (kept in
# `pinned`, they pin the heap's top); `resident()` is the process's resident MiB.
_FRAGMENT = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    pinned = []
    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    def fragment():
        blocks = [libc.malloc(100_000) for _ in range(3000)]
        for b in blocks:
            libc.memset(b, 1, 100_000)
        pinned.extend(blocks[::50])
        for i, b in enumerate(blocks):
            if i % 50:
                libc.free(b)
""")

# Resident MiB before and after release_freed_memory().
_CHILD = _FRAGMENT + textwrap.dedent("""
    from pipeline.run.heap import release_freed_memory
    fragment()
    before = resident()
    release_freed_memory()
    print(before, resident())
""")


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")
def test_memory_a_step_freed_is_handed_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before - after > 200, f"resident {before} MiB before, {after} MiB after release_freed_memory"


# Two steps under the runner: the first fragments the heap and writes the resident MiB at its end,
# the second writes it when it starts.
_RUN = _FRAGMENT + textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.run.runner import Runner, Step
    folder = Path(sys.argv[1])
    def first(io):
        fragment()
        io.out(folder / "a.txt").write_text(str(resident()))
    def second(io):
        io.out(folder / "b.txt").write_text(str(resident()))
    (folder / "in.txt").write_text("x")
    steps = [Step("a", "convert", {}, [folder / "in.txt"], [folder / "a.txt"], first),
             Step("b", "imatrix", {}, [folder / "a.txt"], [folder / "b.txt"], second)]
    Runner(folder, echo=lambda line: None).run(steps)
""")


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")
def test_the_next_step_does_not_carry_what_the_last_one_freed(tmp_path):
    subprocess.run([sys.executable, "-c", _RUN, str(tmp_path)], check=True)
    at_end_of_a, at_start_of_b = int((tmp_path / "a.txt").read_text()), int((tmp_path / "b.txt").read_text())
    assert at_end_of_a - at_start_of_b > 200, f"step a ended at {at_end_of_a} MiB, step b began at {at_start_of_b} MiB"

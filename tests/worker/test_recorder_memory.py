"""The recorder process hands freed frame copies back to the OS (issue 13's soak growth).

The recorder copies every frame out of the ring and frees the copy once written. Carved out
of the glibc heap, a burst of such copies stays resident after the writer drained it, pinned
by the small blocks allocated among them; the recorder's RSS rose with every burst. The probe
runs in a fresh interpreter: the heap and the allocator's settings are per process.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: after the recorder's process entry ran: 300 Breakout-sized frame copies (~29 MiB), each
#: followed by a small long-lived block, then the copies freed; prints the KiB still resident
_PROBE = """
import gc, sys
from pathlib import Path
import numpy as np
from iwm_bus.bus.transport import Endpoints
from workers.recorder import RecorderConfig, run_recorder

def rss_kib():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

run_dir = Path(sys.argv[1])
existing = run_dir / "exists.mcap"
existing.write_bytes(b"keep me")
assert run_recorder(RecorderConfig(path=existing), Endpoints.ipc(run_dir), "iwmr_none") == 2
frames, pins = [], []
before = rss_kib()
for _ in range(300):
    frames.append(np.ones((210, 160, 3), np.uint8))
    pins.append(bytes(2000))
del frames
gc.collect()
print(rss_kib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator and /proc")
def test_recorder_process_returns_freed_frame_copies(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resident_kib = int(out.stdout.split()[-1])
    # 300 pins of 2 KB stay (~0.6 MiB); the 29 MiB of freed copies must not
    assert resident_kib < 4 << 10, f"{resident_kib} KiB of freed frame copies still resident"

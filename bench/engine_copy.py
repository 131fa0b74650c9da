"""Child process of the benchmark: one engine copy, its result as JSON.

Run apart from the benchmark driver so its CPU time and peak RSS are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from virtbackupd.adapters.nbd.client import UnixAddress
from virtbackupd.engine.datapath.copy import CopyOptions, ZeroMode, copy_export


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("target")
    ap.add_argument("--bitmap")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--in-flight", type=int, default=CopyOptions().in_flight)
    ap.add_argument("--zero", default="skip")
    a = ap.parse_args()
    opts = CopyOptions(in_flight=a.in_flight, zero_mode=ZeroMode(a.zero))
    r = asyncio.run(
        copy_export(
            UnixAddress(a.source),
            "disk",
            UnixAddress(a.target),
            "disk",
            dirty_bitmap=a.bitmap,
            connections=a.connections,
            options=opts,
        )
    )
    print(
        json.dumps(
            {
                "read": r.bytes_read,
                "written": r.bytes_written,
                "zeroed": r.bytes_zeroed,
                "duration": r.duration,
                "digest": r.digest,
            }
        )
    )


if __name__ == "__main__":
    main()

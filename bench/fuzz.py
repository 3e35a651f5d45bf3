"""``make fuzz``: the fuzz campaign (:mod:`mplslb.fuzz`) from the command line: hostile frames through receive,
receive_batch, receive_block and the XDP program, each checked against the one-frame path, every frame accounted
for. ``--endpoints`` (``make fuzz-endpoints``): the endpoints' campaign (:mod:`mplslb.offload.endpoint_fuzz`),
hostile frames and packets through the kernel programs and the Python endpoint of both roles, compared frame by
frame. Exits 1 at the first difference, exception or unaccounted frame, printing the seed and the frame."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mplslb.fuzz import SHARED_DATA, Mismatch, campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=10_000_000, help="hostile frames to send (default 10 million)")
    parser.add_argument("--seed", type=int, default=1, help="the seed every frame follows from (default 1)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="shared/data with the captures")
    parser.add_argument("--no-kernel", action="store_true", help="leave the XDP program out")
    parser.add_argument("--endpoints", action="store_true", help="the endpoints' campaign (root, clang)")
    args = parser.parse_args(argv)
    print(f"fuzz: {args.frames:,} frames, seed {args.seed}" + (", the endpoints" if args.endpoints else ""), flush=True)
    try:
        if args.endpoints:
            from mplslb.offload import endpoint_fuzz

            endpoints = endpoint_fuzz.campaign(
                args.frames, args.seed, captures=args.data, progress=lambda line: print(line, flush=True)
            )
            print("\n".join(endpoints.lines()))
            return 0
        report = campaign(
            args.frames,
            args.seed,
            captures=args.data,
            kernel=not args.no_kernel,
            progress=lambda line: print(line, flush=True),
        )
    except Mismatch as exc:
        print(f"FAILED (seed {args.seed}): {exc}", flush=True)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

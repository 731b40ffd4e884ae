"""Generate the synthetic video-text demo set (coloured shapes moving; captions from their parameters).

    python jobs/make_synthetic.py --output demo_out/data --num-videos 200 --split-ratio 0.8

Writes clips, train/eval shards with manifests, and UMT-format eval annotations (see docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.data.synthetic import make_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output folder or URL (s3://bucket/prefix)")
    parser.add_argument("--num-videos", type=int, default=200)
    parser.add_argument("--split-ratio", type=float, default=0.8, help="fraction of videos in the train split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--shard-size", type=int, default=50, help="clips per train shard")
    parser.add_argument("--workers", type=int, default=1, help="parallel shard-writer processes")
    args = parser.parse_args(argv)
    paths = make_synthetic(
        args.output, args.num_videos, args.split_ratio, args.seed, args.num_frames, args.size, args.fps,
        args.shard_size, args.workers,
    )  # fmt: skip
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

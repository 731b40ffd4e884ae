"""Check a shard set: samples per shard, bad samples with reasons, duration statistics.

    python jobs/inspect_shards.py s3://bucket/webvid/train --decode --max-bad-fraction 0.01

Exits 1 when the fraction of bad samples is above --max-bad-fraction (default 0: any bad sample), when a shard
holds no sample, or when the manifest beside the shards gives another sample count than the shard has; shards the
manifest does not list are named.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.data.check import inspect_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="+", help="shard directory/prefix, brace pattern or .tar URLs")
    parser.add_argument("--decode", action="store_true", help="decode every frame of every mp4 (slower)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--max-bad-fraction", type=float, default=0.0, help="exit 1 above this bad fraction")
    args = parser.parse_args(argv)
    report = inspect_shards(args.url, decode=args.decode, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        d = report["duration_s"]
        print(f"{report['num_samples']} samples in {report['num_shards']} shards; decoded: {report['decoded']}")
        print(f"duration s: total {d['total']} min {d['min']} mean {d['mean']} max {d['max']}")
        print(f"bad samples: {report['num_bad']} ({report['bad_fraction']:.2%})")
        for item in report["bad"][:20]:
            print(f"  {item['shard']} {item['key']}: {item['reason']}")
        for url in report["empty_shards"]:
            print(f"empty shard (no samples): {url}")
        for item in report["manifest_mismatch"]:
            print(f"manifest lists {item['manifest']} samples, the shard has {item['read']}: {item['url']}")
        if report["manifest_error"]:
            print(f"manifest unreadable: {report['manifest_error']}")
        for url in report["not_in_manifest"]:
            print(f"not listed in its manifest.json: {url}")
    broken = report["empty_shards"] or report["manifest_mismatch"] or report["manifest_error"]
    return 1 if report["bad_fraction"] > args.max_bad_fraction or broken else 0


if __name__ == "__main__":
    sys.exit(main())

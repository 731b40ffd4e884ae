"""Write a video list into WebDataset shards (`<name>-000000.tar` + manifest.json); rerun to resume.

    python jobs/make_shards.py --input videos.csv --output s3://bucket/webvid/train --shard-size 500 --workers 8
    # training shards: short side 256, keyframe every 8 frames, no B-frames, fast-decode H.264, no audio
    python jobs/make_shards.py --input list.jsonl --output data/train --transcode --short-side 256 --gop 8 \
        --bframes 0 --tune fastdecode
    # labelled (classification) shards: a `video,label` list and the data set's class-index file
    python jobs/make_shards.py --input k400_train.csv --output s3://bucket/k400/train --classes k400_classes.txt

The list is CSV (header `video,caption[,video_id]`; a caption cell may hold a JSON list) or JSONL
(`{"video": ..., "caption": str | [str]}`); relative video paths resolve against the list's folder.
A classification list has a `label` column (header `video,label`; a class name or index, caption optional): its
samples carry `label`/`label_name` and the class-index file lands beside the shards as `classes.txt` (give the
same `--classes` file to every split of one data set).
S3 endpoints and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.shards import TranscodeOptions, make_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="CSV or JSONL list of video,caption rows")
    parser.add_argument("--output", required=True, help="shard directory: local path, s3://bucket/prefix, gs://...")
    parser.add_argument("--shard-size", type=int, default=100, help="input rows per shard (default 100)")
    parser.add_argument("--name", default=None, help="shard file prefix (default: the output folder's name)")
    parser.add_argument("--transcode", action="store_true", help="re-encode every video as H.264 mp4")
    parser.add_argument("--short-side", type=int, default=None, help="with --transcode: resize the short side")
    parser.add_argument("--fps", type=float, default=None, help="with --transcode: resample to this frame rate")
    parser.add_argument("--gop", type=int, default=None, help="with --transcode: a keyframe every N frames")
    parser.add_argument("--bframes", type=int, default=None, help="with --transcode: B-frames (0 = none)")
    parser.add_argument("--crf", type=int, default=23, help="with --transcode: libx264 quality (default 23)")
    parser.add_argument("--preset", default="veryfast", help="with --transcode: libx264 preset (default veryfast)")
    parser.add_argument("--tune", default=None, help="with --transcode: libx264 tune, e.g. fastdecode")
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    parser.add_argument("--classes", default=None,
                        help="class-index file for a labelled list (one class name per line, line i = class i); "
                             "default: derived from the list's labels")
    args = parser.parse_args(argv)
    encoding = {"short_side": args.short_side, "fps": args.fps, "gop": args.gop, "bframes": args.bframes,
                "crf": args.crf, "preset": args.preset, "tune": args.tune}  # fmt: skip
    if not args.transcode and any(v != parser.get_default(k) for k, v in encoding.items()):
        parser.error("--short-side, --fps, --gop, --bframes, --crf, --preset and --tune need --transcode")
    try:
        transcode = TranscodeOptions(**encoding) if args.transcode else None
    except ValueError as err:
        parser.error(str(err))
    manifest = make_shards(args.input, args.output, args.shard_size, transcode, args.workers, args.name,
                           class_index=args.classes)
    print(
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest['total_duration_s'] / 3600:.2f} h of video) at {args.output}; "
        f"{len(manifest['skipped'])} inputs skipped (listed in manifest.json)"
    )
    if "num_classes" in manifest:
        print(f"{manifest['num_classes']} classes, index in {args.output.rstrip('/')}/classes.txt")
    for item in manifest["skipped"][:10]:
        print(f"  skipped {item['video']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

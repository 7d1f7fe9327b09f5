"""`python -m minivgg summary D [--input-size 224] [--width 1.0] [--fc-width 4096]`."""

import argparse
import sys

from minivgg.summary import summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivgg",
                                     description="minivgg command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print the layer table of a VGG configuration")
    s.add_argument("config", help="A, A-LRN, B, C, D, E (or vgg11/13/16/19)")
    s.add_argument("--input-size", type=int, default=224)
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--width", type=float, default=1.0)
    s.add_argument("--fc-width", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        print(summary(args.config, args.input_size, args.num_classes, args.width,
                      args.fc_width))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

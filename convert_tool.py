#!/usr/bin/env python3
"""The original caffe-int8-convert-tools command line, kept for its users.

    python convert_tool.py --proto deploy.prototxt --model model.caffemodel --mean 104 117 123 --norm 1 \
        --images DIR --output model.table [--gpu N]

It runs ``int8conv calibrate`` (all of its options work here too); ``--ncnn-dir OUT`` also converts and
quantizes the model for ncnn in one shot.
"""

import sys

from int8conv.legacy_cli import main

if __name__ == "__main__":
    sys.exit(main())

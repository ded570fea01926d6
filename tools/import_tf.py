"""Import a TF Object Detection API SSDLite-MobileNetV2 frozen graph (no TensorFlow needed).

    python tools/import_tf.py GRAPH.pb --out CKPT [--pipeline pipeline.config]
                              [--label-map labels.pbtxt | --class-names a,b,...] [--check]

Writes a checkpoint tools/evaluate.py loads (`python tools/evaluate.py task=det ckpt_path=CKPT`):
{"state_dict": {"model.<key>": ...}, "mnv2": {"task": "det", "config": {"model": {...}}, "meta": {...}}}.
--check compares the imported model with TensorFlow's own outputs stored in
tests/fixtures/tf_ssdlite/reference.npz (made by make_reference.py for the pedestrian SSDLite
graph) and prints the max abs differences.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tf_ssdlite" / "reference.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path, help="frozen_inference_graph.pb")
    parser.add_argument("--out", type=Path, help="checkpoint to write (.ckpt)")
    parser.add_argument("--pipeline", type=Path, help="the model's pipeline.config (fills what the graph lacks)")
    parser.add_argument("--label-map", type=Path, help="TF OD API label map (.pbtxt) for class names")
    parser.add_argument("--class-names", help="comma-separated class names (instead of --label-map)")
    parser.add_argument("--check", action="store_true", help="compare with TF's outputs in --reference")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="reference .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.out is None and not args.check:
        parser.error("give --out CKPT and/or --check")

    import numpy as np
    import torch

    from backbone.errors import Mnv2Error
    from backbone.training.downloads import sha256_file
    from mnv2det import tf_import

    try:
        names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
        result = tf_import.import_graph(args.graph, pipeline=args.pipeline, class_names=names,
                                        label_map=args.label_map)
        info = result.info.as_dict()
        info.pop("anchor_layers")
        print("read from the graph:", json.dumps(info))
        print("model config:", json.dumps(result.config))
        print("classes:", result.meta["class_names"][:10], "..." if len(result.meta["class_names"]) > 10 else "")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tf_import.checkpoint_dict(result, args.graph), args.out)
            print(f"wrote {args.out}")
        if args.check:
            ref = dict(np.load(args.reference))
            if str(ref["graph_sha256"]) != sha256_file(args.graph):
                print(f"error: {args.reference} was made from another graph (sha256 {ref['graph_sha256']})",
                      file=sys.stderr)
                return 2
            print(f"parity with TensorFlow {ref['tf_version']} ({args.reference.name}), max |ours - TF|:")
            diffs = tf_import.reference_diffs(result.model, ref)
            dets = tf_import.reference_detections(result.model, ref)
            dets_photo = tf_import.reference_detections(result.model, ref, from_photo=True)
            for photo, d in diffs.items():
                print(f"  {photo:10s} box_encodings {d['box_encodings']:.2e}  class_logits {d['class_logits']:.2e}  "
                      f"anchors {d['anchors']:.2e}  our preprocessing vs TF's input {d.get('input', float('nan')):.2e}")
                for label, det in (("TF input", dets.get(photo)), ("raw photo", dets_photo.get(photo))):
                    if det is None:  # raw photos need scikit-image (pip install -e ".[dev]")
                        continue
                    print(f"  {'':10s} detections >= 0.05 from {label:9s}: TF {det['n_tf']}, ours {det['n_ours']}, "
                          f"min IoU {det['min_iou']:.6f}, max |score diff| {det['max_score_diff']:.2e}")
    except Mnv2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

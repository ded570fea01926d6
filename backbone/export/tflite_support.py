"""The TFLite Support metadata that MediaPipe Tasks and the TFLite Task Library read, written with
MediaPipe's own metadata writers (``mediapipe.tasks.python.metadata.metadata_writers``).

Written for mobile-layout files (:mod:`backbone.export.layout`) beside the ``mnv2`` contract entry:
input normalisation mean 0 / std 1 (the ImageNet normalisation stays inside the graph: MediaPipe
refuses per-channel values), the label map, and the output roles. The detector writer assigns roles
by output index -- location, category, score, number of detections, exactly the mobile layout's
order -- with box properties ymin, xmin, ymax, xmax as ratios of the input; the segmenter writer
marks the ``(1, H, W, K)`` output as the segmentation masks with a softmax activation (MediaPipe's
confidence masks are then probabilities; the category mask is the argmax either way).

mediapipe's wheels (1.2.3 seen) ship those writers without their one native helper,
``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version`` (``ModuleNotFoundError: No module
named 'mediapipe.tasks.cc'``): where it is missing, :func:`min_parser_version` stands in for it.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from backbone.export.layout import MOBILE_DET_OUTPUTS, MOBILE_SEG_OUTPUT

_NATIVE_VERSION_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def min_parser_version(metadata_buffer: bytes) -> str:
    """The oldest metadata parser that reads ``metadata_buffer`` (a ``ModelMetadata`` flatbuffer): the
    newest schema member it uses, with the versions of MediaPipe's ``metadata_version.cc`` (members
    added after 1.0.0: vocabulary files 1.0.1; process units 1.1.0 (tokenizers too), regex tokenizer
    1.2.1; tensor groups 1.2.0; audio properties 1.3.0; ScaNN index files 1.4.0; file versions
    1.4.1; custom metadata 1.5.0)."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    md = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(bytearray(metadata_buffer), 0))
    found = [(1, 0, 0)]
    unit_versions = {fb.ProcessUnitOptions.BertTokenizerOptions: (1, 1, 0),
                     fb.ProcessUnitOptions.SentencePieceTokenizerOptions: (1, 1, 0),
                     fb.ProcessUnitOptions.RegexTokenizerOptions: (1, 2, 1)}

    def files(entries: Any) -> None:
        for f in entries or []:
            found.append((1, 0, 1) if f.type == fb.AssociatedFileType.VOCABULARY else (1, 0, 0))
            found.append((1, 4, 0) if f.type == fb.AssociatedFileType.SCANN_INDEX_FILE else (1, 0, 0))
            found.append((1, 4, 1) if f.version is not None else (1, 0, 0))

    def units(entries: Any) -> None:
        found.extend(unit_versions.get(u.optionsType, (1, 0, 0)) for u in entries or [])

    for sg in md.subgraphMetadata or []:
        for t in (sg.inputTensorMetadata or []) + (sg.outputTensorMetadata or []):
            files(t.associatedFiles)
            units(t.processUnits)
            if t.content is not None and t.content.contentPropertiesType == fb.ContentProperties.AudioProperties:
                found.append((1, 3, 0))
        files(sg.associatedFiles)
        for entries in (sg.inputProcessUnits, sg.outputProcessUnits):
            if entries is not None:
                found.append((1, 1, 0))
                units(entries)
        if sg.inputTensorGroups is not None or sg.outputTensorGroups is not None:
            found.append((1, 2, 0))
        if sg.customMetadata is not None:
            found.append((1, 5, 0))
    files(md.associatedFiles)
    return ".".join(map(str, max(found)))


def _stand_in_native_helper() -> None:
    try:
        __import__(_NATIVE_VERSION_MODULE)
        return
    except ImportError:
        pass
    parts = _NATIVE_VERSION_MODULE.split(".")
    for i in range(2, len(parts)):  # mediapipe.tasks exists; its .cc sub-packages do not
        name = ".".join(parts[:i + 1])
        module = sys.modules.setdefault(name, types.ModuleType(name))
        setattr(sys.modules[".".join(parts[:i])], parts[i], module)
    sys.modules[_NATIVE_VERSION_MODULE].GetMinimumMetadataParserVersion = min_parser_version


def available() -> bool:
    """Whether MediaPipe's metadata writers import here."""
    try:
        import mediapipe.tasks  # noqa: F401

        _stand_in_native_helper()
        import mediapipe.tasks.python.metadata.metadata_writers.object_detector  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: the writers cannot run here
        return False
    return True


def add_support_metadata(model: bytes, metadata: dict[str, Any]) -> bytes:
    """``model`` (.tflite bytes, mobile layout) with TFLite Support metadata for its outputs.

    Raises ValueError for outputs the writers have no role for (nms=false, argmax=true)."""
    from mediapipe.tasks.python.metadata.metadata_writers import image_segmenter, metadata_writer, object_detector

    outputs = tuple(metadata["outputs"])
    labels = metadata_writer.Labels().add([str(n) for n in metadata["class_names"]])
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if outputs == MOBILE_DET_OUTPUTS:
        writer = object_detector.MetadataWriter.create_for_models_with_nms(bytearray(model), mean, std, labels)
    elif outputs == (MOBILE_SEG_OUTPUT,):
        writer = image_segmenter.MetadataWriter.create(bytearray(model), mean, std, labels,
                                                       activation=image_segmenter.Activation.SOFTMAX)
    else:
        raise ValueError(f"no TFLite Support roles for outputs {list(outputs)}: MediaPipe reads detection with "
                         f"NMS inside ({list(MOBILE_DET_OUTPUTS)}) and segmentation scores ({MOBILE_SEG_OUTPUT})")
    content, _ = writer.populate()
    return bytes(content)
